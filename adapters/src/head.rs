//! A classification adapter's head: the PEFT `SEQ_CLS` `score` tensor with its
//! labels, and the classical prior the trainer may store beside it.

use crate::error::AdapterError;
use crate::peft::{to_f32, BaseShapes};
use retune_classical::{log_softmax, TextClassifier};
use safetensors::SafeTensors;
use std::path::Path;
use std::sync::Arc;

/// The tensor of a classification adapter's head (PEFT `SEQ_CLS`,
/// `modules_to_save = ["score"]`): `[labels, hidden]`, no bias.
pub const HEAD_TENSOR: &str = "base_model.model.score.weight";

/// The safetensors metadata key holding the head's labels (a JSON array of
/// strings, row order), so the weights file carries what its rows mean.
pub const LABELS_METADATA: &str = "retune.labels";

/// Most labels a head may have.
pub const MAX_LABELS: usize = 4096;

/// A classification head: row `i` of `weight` scores `labels[i]` from the last
/// token's final hidden state.
#[derive(Clone, Debug)]
pub struct ClassHead {
    pub labels: Vec<String>,
    /// `[labels, hidden]`, row-major
    pub weight: Vec<f32>,
    pub hidden: usize,
    /// The classical classifier trained on the same rows, when the trainer
    /// stored one: its calibrated probabilities multiply the head's.
    pub prior: Option<Arc<LabelPrior>>,
}

/// The tensor of a head's classical prior (see [`retune_classical::PRIOR_TENSOR`]).
pub const PRIOR_TENSOR: &str = retune_classical::PRIOR_TENSOR;

/// A classical text classifier stored beside a head (TF-IDF features and a
/// linear scorer per label, its probabilities calibrated on out-of-fold rows):
/// the answer is the label most probable under the product of the two, which
/// on Banking77 beats each alone (BENCHMARKS.md).
#[derive(Debug)]
pub struct LabelPrior {
    pub classifier: TextClassifier,
    /// For each head label, its index among the classifier's labels (`None`:
    /// a label too rare for it to learn).
    columns: Vec<Option<usize>>,
}

impl ClassHead {
    /// The log-probability of each label (head order) for a row whose head
    /// scores are `logits`: the head's softmax, times the prior's probability
    /// of `text` when it has a prior and the row a text (a label the prior did
    /// not learn gets the prior's least probability for this text), normalised.
    pub fn log_probs(&self, logits: &[f32], text: Option<&str>) -> Vec<f32> {
        let mut lp = log_softmax(logits, 1.0);
        if let (Some(p), Some(text)) = (&self.prior, text) {
            let q = p.classifier.log_probs(text);
            let least = q.iter().copied().fold(f32::INFINITY, f32::min);
            for (v, c) in lp.iter_mut().zip(&p.columns) {
                *v += c.and_then(|c| q.get(c).copied()).unwrap_or(least);
            }
            lp = log_softmax(&lp, 1.0);
        }
        lp
    }

    /// Bytes its weights hold.
    pub fn bytes(&self) -> usize {
        self.weight.len() * 4 + self.prior.as_ref().map_or(0, |p| p.classifier.bytes())
    }
}

/// The head tensor and its labels (the weights file's metadata), checked
/// against the base's hidden size.
pub(crate) fn load_head(
    bytes: &[u8],
    st_path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    base: &BaseShapes,
) -> Result<ClassHead, AdapterError> {
    let hidden = base.dims[0].1;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| AdapterError::Corrupt {
        path: st_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| AdapterError::Tensor {
        name: name.to_string(),
        reason,
    };
    let labels_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(LABELS_METADATA))
        .ok_or_else(|| {
            bad(format!(
                "the weights file's metadata has no `{LABELS_METADATA}` (the head's labels)"
            ))
        })?;
    let labels: Vec<String> = serde_json::from_str(labels_json).map_err(|e| {
        bad(format!(
            "`{LABELS_METADATA}` is not a JSON list of strings: {e}"
        ))
    })?;
    if labels.len() < 2 || labels.len() > MAX_LABELS {
        return Err(bad(format!("{} labels (2..={MAX_LABELS})", labels.len())));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(l) = labels
        .iter()
        .find(|l| l.trim().is_empty() || !seen.insert(*l))
    {
        return Err(bad(format!("label `{l}` is empty or repeated")));
    }
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[1] != hidden {
        return Err(AdapterError::Shape {
            name: name.to_string(),
            got: shape,
            expected: vec![labels.len(), hidden],
        });
    }
    if shape[0] != labels.len() {
        return Err(bad(format!(
            "{} rows for {} labels in `{LABELS_METADATA}`",
            shape[0],
            labels.len()
        )));
    }
    let weight = to_f32(name, view)?;
    if weight.iter().any(|x| !x.is_finite()) {
        return Err(bad("non-finite weights".into()));
    }
    Ok(ClassHead {
        labels,
        weight,
        hidden,
        prior: None,
    })
}

/// The classical prior stored beside a head: its description in the weights
/// file's metadata, its weights in [`PRIOR_TENSOR`]; its labels must be the
/// head's (some may be missing: too rare for it to learn).
pub(crate) fn load_prior(
    bytes: &[u8],
    st_path: &Path,
    view: &safetensors::tensor::TensorView<'_>,
    labels: &[String],
) -> Result<LabelPrior, AdapterError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| AdapterError::Corrupt {
        path: st_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| AdapterError::Tensor {
        name: PRIOR_TENSOR.to_string(),
        reason,
    };
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(retune_classical::PRIOR_METADATA))
        .ok_or_else(|| {
            bad(format!(
                "the weights file's metadata has no `{}` (the classifier's description)",
                retune_classical::PRIOR_METADATA
            ))
        })?;
    let weights = to_f32(PRIOR_TENSOR, view)?;
    let classifier = TextClassifier::import(json, &weights).map_err(|e| bad(e.to_string()))?;
    let rows = classifier.labels().len();
    if view.shape().len() != 2 || view.shape()[0] != rows {
        return Err(AdapterError::Shape {
            name: PRIOR_TENSOR.to_string(),
            got: view.shape().to_vec(),
            expected: vec![rows, weights.len() / rows.max(1)],
        });
    }
    let at: std::collections::HashMap<&str, usize> = classifier
        .labels()
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    if let Some(l) = classifier.labels().iter().find(|l| !labels.contains(l)) {
        return Err(bad(format!("label `{l}` is not one of the head's")));
    }
    let columns = labels.iter().map(|l| at.get(l.as_str()).copied()).collect();
    Ok(LabelPrior {
        classifier,
        columns,
    })
}

/// What a writer puts in a classifier adapter's weights file for `prior`: the
/// metadata entry ([`retune_classical::PRIOR_METADATA`], its description) and
/// the [`PRIOR_TENSOR`]: shape, dtype and little-endian bytes (f16, half the
/// size, scores changing in the fourth digit; f32 where a weight is beyond f16).
pub fn prior_parts(
    prior: &TextClassifier,
) -> ((String, String), Vec<usize>, safetensors::Dtype, Vec<u8>) {
    let (json, weights) = prior.export();
    let rows = prior.labels().len();
    let shape = vec![rows, weights.len() / rows.max(1)];
    let (dtype, bytes) = if weights.iter().all(|x| x.abs() < 60_000.0) {
        let b = weights
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        (safetensors::Dtype::F16, b)
    } else {
        let b = weights.iter().flat_map(|x| x.to_le_bytes()).collect();
        (safetensors::Dtype::F32, b)
    };
    (
        (retune_classical::PRIOR_METADATA.to_string(), json),
        shape,
        dtype,
        bytes,
    )
}

/// A classifier adapter's weights file (`st`) with `prior` as its classical
/// prior (an earlier one replaced); the head's labels must include the prior's.
pub fn with_prior(st: &[u8], prior: &TextClassifier) -> Result<Vec<u8>, AdapterError> {
    let corrupt = |reason: String| AdapterError::Corrupt {
        path: "adapter_model.safetensors".into(),
        reason,
    };
    let parsed = SafeTensors::deserialize(st).map_err(|e| corrupt(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(st).map_err(|e| corrupt(e.to_string()))?;
    let mut meta = meta.metadata().clone().unwrap_or_default();
    let labels: Vec<String> = meta
        .get(LABELS_METADATA)
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| AdapterError::Tensor {
            name: HEAD_TENSOR.into(),
            reason: format!("not a classifier: no `{LABELS_METADATA}` in its metadata"),
        })?;
    if let Some(l) = prior.labels().iter().find(|l| !labels.contains(l)) {
        return Err(AdapterError::Tensor {
            name: PRIOR_TENSOR.into(),
            reason: format!("label `{l}` is not one of the head's"),
        });
    }
    let ((key, json), shape, dtype, bytes) = prior_parts(prior);
    meta.insert(key, json);
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = parsed
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != PRIOR_TENSOR)
        .collect();
    views.push((
        PRIOR_TENSOR.to_string(),
        safetensors::tensor::TensorView::new(dtype, shape, &bytes)
            .map_err(|e| corrupt(e.to_string()))?,
    ));
    sorted_metadata(safetensors::serialize(views, Some(meta)).map_err(|e| corrupt(e.to_string()))?)
}

/// `st` (a safetensors file) with its metadata entries in sorted order:
/// `safetensors::serialize` writes them in a `HashMap`'s order, which differs
/// from run to run once there are two, and a version's bytes must not (its
/// content id, resumed runs landing on the same bytes).
pub fn sorted_metadata(st: Vec<u8>) -> Result<Vec<u8>, AdapterError> {
    let corrupt = |reason: String| AdapterError::Corrupt {
        path: "adapter_model.safetensors".into(),
        reason,
    };
    let n = st
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
        .filter(|n| st.len() >= 8 + n)
        .ok_or_else(|| corrupt("header out of bounds".into()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&st[8..8 + n]).map_err(|e| corrupt(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> = header
        .into_iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("__metadata__", serde_json::Value::Object(m)) => {
                let mut e: Vec<_> = m.into_iter().collect();
                e.sort_by(|a, b| a.0.cmp(&b.0));
                (k, serde_json::Value::Object(e.into_iter().collect()))
            }
            (_, v) => (k, v),
        })
        .collect();
    let mut json = serde_json::to_vec(&header).map_err(|e| corrupt(e.to_string()))?;
    // padded with spaces to 8 bytes, as safetensors writes it
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + st.len() - 8 - n);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    out.extend_from_slice(&st[8 + n..]);
    Ok(out)
}
