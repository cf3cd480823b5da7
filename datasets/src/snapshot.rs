//! Curation of a tenant/adapter's examples into an immutable snapshot: imports
//! plus corrected captures (a correction wins over the output; +1-rated outputs
//! by policy; -1 without a correction never), PII scrubbed by policy, duplicates
//! merged, conflicting outputs for one input held out and listed, split by the
//! input's hash; every drop counted by reason.

use crate::curate::{input_key, scrub, split_of, Scrubbed, Split};
use crate::record::{ExampleBody, Message};
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
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            include_positive: true,
            scrub: true,
            eval_percent: 10,
        }
    }
}

/// Where a candidate example came from, before curation.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    Import {
        id: i64,
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
}

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
    Ok(match &c.body {
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
    })
}

fn origin_name(o: &Origin) -> String {
    match o {
        Origin::Import { id } => format!("import:{id}"),
        Origin::Capture { id, .. } => format!("completion:{id}"),
    }
}

pub fn curate(cands: &[Candidate], p: &Policy) -> Curated {
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut scrubbed = Scrubbed::default();
    // input key -> (output -> row)
    let mut by_input: BTreeMap<String, BTreeMap<String, SnapshotRow>> = BTreeMap::new();
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
                    },
                );
            }
        }
    }
    let mut rows = Vec::new();
    let mut conflicts = Vec::new();
    for (key, outputs) in by_input {
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
