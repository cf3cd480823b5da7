//! The review queue of suspect labels (`data.suspects = "review"`): the suspect
//! rows of an adapter's latest snapshot that no person has ruled on yet, and a
//! person's verdict written as an example of its own ([`REVIEW_SOURCE`]), which
//! wins over every other output for the same input at the next snapshot and is
//! never suspect again.

use crate::curate::{input_key, Split};
use crate::error::DataError;
use crate::record::{ExampleBody, ImportRow};
use crate::snapshot::{classifier_text, REVIEW_SOURCE};
use crate::DatasetStore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One suspect row waiting for a person.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewItem {
    pub input_key: String,
    /// What the person reads: the row's user turns (or prompt).
    pub input: String,
    pub split: Split,
    pub given: String,
    pub suggested: String,
    pub given_p: f32,
    pub suggested_p: f32,
}

/// The queue of one adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewQueue {
    /// The snapshot whose suspects these are (`None`: no snapshot looked for any).
    pub snapshot: Option<String>,
    pub items: Vec<ReviewItem>,
    /// Suspects of that snapshot a person has ruled on since.
    pub reviewed: usize,
}

/// The input key of an example body, as curation computes it.
pub fn key_of(body: &ExampleBody) -> String {
    input_key(&body.input_output().0)
}

/// The suspects of the latest snapshot of `tenant/adapter` that looked for
/// them, less those a person has ruled on.
pub fn queue(
    store: &dyn DatasetStore,
    tenant: &str,
    adapter: &str,
) -> Result<ReviewQueue, DataError> {
    let latest = store
        .snapshots(tenant, Some(adapter))?
        .into_iter()
        .rev()
        .find(|m| m.suspects.is_some());
    let Some(m) = latest else {
        return Ok(ReviewQueue {
            snapshot: None,
            items: Vec::new(),
            reviewed: 0,
        });
    };
    let done = store.reviewed_keys(tenant, adapter)?;
    let rows = store.snapshot_rows(tenant, &m.id)?;
    let input: std::collections::HashMap<&str, String> = rows
        .iter()
        .map(|r| (r.input_key.as_str(), classifier_text(&r.body)))
        .collect();
    let mut reviewed = 0;
    let mut items = Vec::new();
    for s in m.suspects.iter().flat_map(|s| &s.rows) {
        if done.contains(&s.input_key) {
            reviewed += 1;
            continue;
        }
        items.push(ReviewItem {
            input_key: s.input_key.clone(),
            input: input.get(s.input_key.as_str()).cloned().unwrap_or_default(),
            split: s.split,
            given: s.given.clone(),
            suggested: s.suggested.clone(),
            given_p: s.given_p,
            suggested_p: s.suggested_p,
        });
    }
    Ok(ReviewQueue {
        snapshot: Some(m.id),
        items,
        reviewed,
    })
}

/// What a verdict wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reviewed {
    pub input_key: String,
    pub label: String,
    /// Examples written: one per subject of the row (so that erasing any of
    /// them erases the verdict too), one when it has none.
    pub written: usize,
}

/// A person's `label` for the row `input_key` of the latest snapshot of
/// `tenant/adapter` that holds it, stored durably as an example of its own.
/// `labels`: the task's label set, when declared (a label outside it is refused).
pub fn review(
    store: &dyn DatasetStore,
    tenant: &str,
    adapter: &str,
    key: &str,
    label: &str,
    labels: Option<&[String]>,
) -> Result<Reviewed, DataError> {
    let label = label.trim();
    if label.is_empty() {
        return Err(DataError::invalid("label", "must not be empty"));
    }
    if let Some(ls) = labels.filter(|ls| !ls.iter().any(|l| l == label)) {
        return Err(DataError::invalid(
            "label",
            format!("`{label}` is not one of the task's {} labels", ls.len()),
        ));
    }
    // the newest snapshot holding the row (a verdict may come after newer ones)
    let mut found = None;
    for m in store.snapshots(tenant, Some(adapter))?.into_iter().rev() {
        if let Some(r) = store
            .snapshot_rows(tenant, &m.id)?
            .into_iter()
            .find(|r| r.input_key == key)
        {
            found = Some(r);
            break;
        }
    }
    let row = found.ok_or_else(|| {
        DataError::NotFound(format!(
            "input `{key}` in the snapshots of {tenant}/{adapter}"
        ))
    })?;
    let body = crate::snapshot::with_answer(&row.body, label.to_string());
    let subjects: Vec<Option<String>> = if row.subject_ids.is_empty() {
        vec![None]
    } else {
        row.subject_ids.iter().cloned().map(Some).collect()
    };
    let rows: Vec<ImportRow> = subjects
        .into_iter()
        .map(|subject_id| ImportRow {
            body: body.clone(),
            subject_id,
            label: Some(label.to_string()),
        })
        .collect();
    let written = store.import(tenant, adapter, REVIEW_SOURCE, &rows)?;
    Ok(Reviewed {
        input_key: key.to_string(),
        label: label.to_string(),
        written,
    })
}

/// The input keys of `rows`' review verdicts (for [`DatasetStore::reviewed_keys`]).
pub(crate) fn keys_of(bodies: impl Iterator<Item = ExampleBody>) -> BTreeSet<String> {
    bodies.map(|b| key_of(&b)).collect()
}
