//! What the SQLite and PostgreSQL stores share: how stored rows become records,
//! manifests and split decisions. The SQL differs; the meaning does not.

use crate::curate::Split;
use crate::error::DataError;
use crate::record::{ExampleBody, Feedback, FeedbackState, Rating};
use crate::snapshot::{Candidate, Curated, Manifest, Origin, Policy};
use std::collections::BTreeMap;

/// One stored feedback row: rating, correction, labels (JSON), subject, comment, time.
pub(crate) type FeedbackRow = (
    Option<i64>,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    i64,
);

/// The state of completion `id` after its feedback rows, oldest first.
pub(crate) fn feedback_state(
    id: &str,
    rows: impl IntoIterator<Item = FeedbackRow>,
) -> Result<FeedbackState, DataError> {
    let mut st = FeedbackState {
        completion_id: id.into(),
        ..FeedbackState::default()
    };
    for (rating, correction, labels, subject_id, comment, at) in rows {
        let fb = Feedback {
            completion_id: id.into(),
            rating: rating.map(Rating::from_i64).transpose()?,
            correction,
            labels: parse::<BTreeMap<String, String>>(&labels, "feedback labels")?,
            subject_id,
            comment,
        };
        st.apply(&fb, at);
    }
    Ok(st)
}

/// A captured completion as a curation candidate: its request (JSON text) with
/// the output as the assistant's answer, and its feedback.
pub(crate) fn capture_candidate(
    id: String,
    request: &str,
    output: String,
    fb: &FeedbackState,
) -> Result<Candidate, DataError> {
    let req: serde_json::Value = parse(request, "captured request")?;
    let body = if let Some(ms) = req.get("messages") {
        let mut messages: Vec<crate::record::Message> = serde_json::from_value(ms.clone())
            .map_err(|e| DataError::Db(format!("captured messages: {e}")))?;
        messages.push(crate::record::Message {
            role: "assistant".into(),
            content: output,
            weight: None,
        });
        ExampleBody::Chat { messages }
    } else {
        ExampleBody::Text {
            prompt: req
                .get("prompt")
                .and_then(|p| p.as_str())
                .unwrap_or_default()
                .into(),
            completion: output,
        }
    };
    Ok(Candidate {
        body,
        origin: Origin::Capture {
            id,
            correction: fb.correction.clone(),
            rating: fb.rating,
        },
        subject_id: fb.subject_id.clone(),
        label: fb.labels.get("label").cloned(),
    })
}

/// The manifest of a new snapshot `id` of curated rows `c`.
pub(crate) fn manifest(
    id: &str,
    tenant: &str,
    adapter: &str,
    policy: &Policy,
    c: &Curated,
    created_at: i64,
) -> Manifest {
    let mut labels: BTreeMap<String, (usize, usize)> = Default::default();
    for r in &c.rows {
        if let Some(l) = &r.label {
            let e = labels.entry(l.clone()).or_default();
            match r.split {
                Split::Train => e.0 += 1,
                Split::Eval => e.1 += 1,
            }
        }
    }
    let eval = c.rows.iter().filter(|r| r.split == Split::Eval).count();
    Manifest {
        id: id.into(),
        tenant: tenant.into(),
        adapter: adapter.into(),
        created_at,
        policy: policy.clone(),
        train: c.rows.len() - eval,
        eval,
        labels,
        dropped: c.dropped.clone(),
        conflicts: c.conflicts.clone(),
        scrubbed: c.scrubbed.clone(),
        erased: 0,
        suspects: None,
    }
}

/// The side of a labelled input seen for the first time, given how many inputs
/// of its label are assigned (`total`) and how many of them to eval: eval when
/// that keeps the label's eval share at or under `percent`.
pub(crate) fn labelled_split(total: i64, eval: i64, percent: i64) -> Split {
    if (eval + 1) * 100 <= (total + 1) * percent {
        Split::Eval
    } else {
        Split::Train
    }
}

pub(crate) fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Eval => "eval",
    }
}

pub(crate) fn split_of_name(s: &str) -> Split {
    if s == "eval" {
        Split::Eval
    } else {
        Split::Train
    }
}

pub(crate) fn js<T: serde::Serialize>(v: &T) -> Result<String, DataError> {
    serde_json::to_string(v).map_err(|e| DataError::Db(e.to_string()))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, DataError> {
    serde_json::from_str(s).map_err(|e| DataError::Db(format!("{what}: {e}")))
}
