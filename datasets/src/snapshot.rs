//! Curation of a tenant/adapter's examples into an immutable snapshot: imports
//! plus corrected captures (a correction wins over the output; +1-rated outputs
//! by policy; -1 without a correction never), PII scrubbed by policy, duplicates
//! merged, conflicting outputs for one input held out and listed, split by the
//! input's hash; every drop counted by reason.

use crate::curate::{input_key, scrub, split_of, Scrubbed, Split};
use crate::record::{ExampleBody, Message};
pub use retune_config::SuspectPolicy;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Outputs rated +1 (without a correction) count as examples.
    pub include_positive: bool,
    /// Replace emails, phone numbers, cards and IBANs before storing.
    pub scrub: bool,
    /// Share of the input-hash space that is held out for eval.
    pub eval_percent: u8,
    /// Suspect labels: listed (`report`, the default, not written into the
    /// policy so earlier snapshots keep their ids), left out of training
    /// (`holdout`), left out until a person reviews them (`review`), or not
    /// looked for (`off`).
    #[serde(default, skip_serializing_if = "SuspectPolicy::is_report")]
    pub suspects: SuspectPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            include_positive: true,
            scrub: true,
            eval_percent: 10,
            suspects: SuspectPolicy::Report,
        }
    }
}

/// A row whose given label the classical classifier, trained without it,
/// confidently puts elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuspectRow {
    pub input_key: String,
    pub split: Split,
    pub given: String,
    pub suggested: String,
    /// Out-of-fold probabilities of the suggested and the given label.
    pub suggested_p: f32,
    pub given_p: f32,
}

/// The snapshot step's look for suspect labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suspects {
    pub policy: SuspectPolicy,
    /// Labelled rows looked at.
    pub checked: usize,
    pub folds: usize,
    /// The classifier's out-of-fold accuracy against the given labels.
    pub oof_accuracy: f32,
    /// Train rows left out of training (policies `holdout` and `review`).
    pub held_out: usize,
    pub seconds: f64,
    /// Why nothing was looked at (too few labels), when so.
    pub note: Option<String>,
    pub rows: Vec<SuspectRow>,
}

/// Where a candidate example came from, before curation.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    Import {
        id: i64,
        /// A person's verdict on this input ([`REVIEW_SOURCE`]): it wins over
        /// every other output for the same input.
        reviewed: bool,
    },
    /// A captured completion with its current feedback.
    Capture {
        id: String,
        correction: Option<String>,
        rating: Option<i64>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub body: ExampleBody,
    pub origin: Origin,
    pub subject_id: Option<String>,
    pub label: Option<String>,
}

/// One row of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRow {
    pub split: Split,
    pub body: ExampleBody,
    /// `import:<id>` or `completion:<id>` (several when duplicates merged).
    pub origins: Vec<String>,
    pub subject_ids: Vec<String>,
    pub label: Option<String>,
    pub input_key: String,
    /// A person gave this row its output (a review verdict): never suspect.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reviewed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The import source of a person's verdict on an example (the review queue).
pub const REVIEW_SOURCE: &str = "review";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub input_key: String,
    pub outputs: Vec<String>,
    pub origins: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub tenant: String,
    pub adapter: String,
    pub created_at: i64,
    pub policy: Policy,
    pub train: usize,
    pub eval: usize,
    /// Train/eval counts per label, where examples have labels.
    pub labels: BTreeMap<String, (usize, usize)>,
    pub dropped: BTreeMap<String, usize>,
    pub conflicts: Vec<Conflict>,
    pub scrubbed: Scrubbed,
    /// Rows removed later by erasure.
    pub erased: usize,
    /// Suspect labels (label tasks; added after the snapshot is stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspects: Option<Suspects>,
}

pub struct Curated {
    pub rows: Vec<SnapshotRow>,
    pub conflicts: Vec<Conflict>,
    pub dropped: BTreeMap<String, usize>,
    pub scrubbed: Scrubbed,
}

fn scrub_body(body: &ExampleBody, n: &mut Scrubbed) -> ExampleBody {
    let mut s = |t: &str| {
        let (out, k) = scrub(t);
        n.add(k);
        out
    };
    match body {
        ExampleBody::Chat { messages } => ExampleBody::Chat {
            messages: messages
                .iter()
                .map(|m| Message {
                    content: s(&m.content),
                    ..m.clone()
                })
                .collect(),
        },
        ExampleBody::Text { prompt, completion } => ExampleBody::Text {
            prompt: s(prompt),
            completion: s(completion),
        },
    }
}

/// The body a capture contributes, or the reason it contributes none.
fn capture_body(c: &Candidate, p: &Policy) -> Result<ExampleBody, &'static str> {
    let Origin::Capture {
        correction, rating, ..
    } = &c.origin
    else {
        return Ok(c.body.clone());
    };
    let output = match (correction, rating) {
        (Some(text), _) => text.clone(),
        (None, Some(1)) if p.include_positive => return Ok(c.body.clone()),
        (None, Some(1)) => return Err("rated_up_excluded_by_policy"),
        (None, Some(_)) => return Err("rated_down_without_correction"),
        (None, None) => return Err("no_feedback"),
    };
    Ok(with_answer(&c.body, output))
}

/// `body` answered with `output` (its assistant turn or completion replaced).
pub(crate) fn with_answer(body: &ExampleBody, output: String) -> ExampleBody {
    match body {
        ExampleBody::Chat { messages } => {
            let mut m = messages.clone();
            match m.last_mut() {
                Some(last) if last.role == "assistant" => last.content = output,
                _ => m.push(Message {
                    role: "assistant".into(),
                    content: output,
                    weight: None,
                }),
            }
            ExampleBody::Chat { messages: m }
        }
        ExampleBody::Text { prompt, .. } => ExampleBody::Text {
            prompt: prompt.clone(),
            completion: output,
        },
    }
}

fn origin_name(o: &Origin) -> String {
    match o {
        Origin::Import {
            id,
            reviewed: false,
        } => format!("import:{id}"),
        Origin::Import { id, reviewed: true } => format!("review:{id}"),
        Origin::Capture { id, .. } => format!("completion:{id}"),
    }
}

pub fn curate(cands: &[Candidate], p: &Policy) -> Curated {
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut scrubbed = Scrubbed::default();
    // input key -> (output -> row)
    let mut by_input: BTreeMap<String, BTreeMap<String, SnapshotRow>> = BTreeMap::new();
    // input key -> the latest review verdict's output
    let mut verdicts: BTreeMap<String, String> = BTreeMap::new();
    for c in cands {
        let body = match capture_body(c, p) {
            Ok(b) => b,
            Err(reason) => {
                *dropped.entry(reason.into()).or_default() += 1;
                continue;
            }
        };
        let body = if p.scrub {
            scrub_body(&body, &mut scrubbed)
        } else {
            body
        };
        let (input, output) = body.input_output();
        if input.is_empty() || output.is_empty() {
            *dropped.entry("empty_input_or_output".into()).or_default() += 1;
            continue;
        }
        let key = input_key(&input);
        let reviewed = matches!(c.origin, Origin::Import { reviewed: true, .. });
        if reviewed {
            // candidates come oldest first: the last verdict wins
            verdicts.insert(key.clone(), output.clone());
        }
        let outputs = by_input.entry(key.clone()).or_default();
        match outputs.get_mut(&output) {
            Some(row) => {
                *dropped.entry("duplicate".into()).or_default() += 1;
                row.origins.push(origin_name(&c.origin));
                row.subject_ids.extend(c.subject_id.clone());
            }
            None => {
                outputs.insert(
                    output,
                    SnapshotRow {
                        split: split_of(&key, p.eval_percent),
                        body,
                        origins: vec![origin_name(&c.origin)],
                        subject_ids: c.subject_id.iter().cloned().collect(),
                        label: c.label.clone(),
                        input_key: key,
                        reviewed: false,
                    },
                );
            }
        }
    }
    let mut rows = Vec::new();
    let mut conflicts = Vec::new();
    for (key, mut outputs) in by_input {
        if let Some(v) = verdicts.get(&key) {
            // a person's verdict settles the input: the other outputs go
            if let Some(mut row) = outputs.remove(v) {
                if !outputs.is_empty() {
                    *dropped.entry("superseded by review".into()).or_default() += outputs.len();
                    for other in outputs.values() {
                        row.subject_ids.extend(other.subject_ids.iter().cloned());
                    }
                }
                row.reviewed = true;
                rows.push(row);
                continue;
            }
        }
        if outputs.len() == 1 {
            rows.extend(outputs.into_values());
        } else {
            *dropped.entry("conflict".into()).or_default() += outputs.len();
            conflicts.push(Conflict {
                input_key: key,
                origins: outputs.values().flat_map(|r| r.origins.clone()).collect(),
                outputs: outputs.into_keys().collect(),
            });
        }
    }
    for r in &mut rows {
        r.subject_ids.sort();
        r.subject_ids.dedup();
    }
    Curated {
        rows,
        conflicts,
        dropped,
        scrubbed,
    }
}

/// The content id of a snapshot: sha256 over the policy and the rows.
pub fn content_id(tenant: &str, adapter: &str, p: &Policy, rows: &[SnapshotRow]) -> String {
    let mut h = Sha256::new();
    h.update(format!("retune-snapshot-v1\0{tenant}\0{adapter}\0"));
    h.update(serde_json::to_vec(p).unwrap_or_default());
    for r in rows {
        h.update(serde_json::to_vec(&(&r.split, &r.body)).unwrap_or_default());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The text the classical classifier reads: an example's user turns (a text
/// example's prompt), without system prompts and the answer.
pub fn classifier_text(body: &ExampleBody) -> String {
    match body {
        ExampleBody::Chat { messages } => user_turns(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        ),
        ExampleBody::Text { prompt, .. } => prompt.clone(),
    }
}

/// [`classifier_text`] of a chat given as (role, content) turns: the user
/// turns joined by newlines, a final assistant turn (the answer) left out.
pub fn user_turns<'a>(turns: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut turns: Vec<(&str, &str)> = turns.collect();
    if turns.last().is_some_and(|t| t.0 == "assistant") {
        turns.pop();
    }
    turns
        .into_iter()
        .filter(|t| t.0 == "user")
        .map(|t| t.1)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Look for suspect labels among a snapshot's labelled rows (every row, train
/// and eval, is scored out of fold; `holdout` leaves only train rows out).
pub fn find_snapshot_suspects(rows: &[SnapshotRow], policy: SuspectPolicy) -> Suspects {
    let t = std::time::Instant::now();
    let labelled: Vec<&SnapshotRow> = rows.iter().filter(|r| r.label.is_some()).collect();
    let texts: Vec<String> = labelled.iter().map(|r| classifier_text(&r.body)).collect();
    let labels: Vec<&str> = labelled
        .iter()
        .map(|r| r.label.as_deref().unwrap_or_default())
        .collect();
    let mut out = Suspects {
        policy,
        checked: labelled.len(),
        folds: 5,
        oof_accuracy: 0.0,
        held_out: 0,
        seconds: 0.0,
        note: None,
        rows: Vec::new(),
    };
    match crate::classical::find_suspects(
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
        &labels,
        out.folds,
        &crate::classical::ClassicalOptions::default(),
    ) {
        Ok(r) => {
            out.oof_accuracy = r.oof_accuracy;
            out.rows = r
                .suspects
                .into_iter()
                // a person's verdict is not second-guessed
                .filter(|s| !labelled[s.index].reviewed)
                .map(|s| SuspectRow {
                    input_key: labelled[s.index].input_key.clone(),
                    split: labelled[s.index].split,
                    given: s.given,
                    suggested: s.suggested,
                    suggested_p: s.suggested_p,
                    given_p: s.given_p,
                })
                .collect();
            if policy.holds_out() {
                out.held_out = out.rows.iter().filter(|r| r.split == Split::Train).count();
            }
        }
        Err(e) => out.note = Some(format!("no suspects looked for: {e}")),
    }
    out.seconds = t.elapsed().as_secs_f64();
    out
}

/// The rows to train on: a snapshot's rows less the suspect train rows its
/// manifest holds out.
pub fn training_rows(m: &Manifest, rows: Vec<SnapshotRow>) -> Vec<SnapshotRow> {
    let Some(s) = m.suspects.as_ref().filter(|s| s.policy.holds_out()) else {
        return rows;
    };
    let out: std::collections::BTreeSet<&str> = s
        .rows
        .iter()
        .filter(|r| r.split == Split::Train)
        .map(|r| r.input_key.as_str())
        .collect();
    rows.into_iter()
        .filter(|r| !(r.split == Split::Train && out.contains(r.input_key.as_str())))
        .collect()
}
