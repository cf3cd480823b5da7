//! A trained classifier as stored beside a label adapter's head: its labels,
//! temperature, vocabularies and idf as JSON (the weights file's metadata,
//! [`PRIOR_METADATA`]), its weights as one `[labels, features + 1]` tensor
//! ([`PRIOR_TENSOR`], the intercept last).

use super::{char_wb_ngrams, word_ngrams, ClassicalError, Features, TextClassifier, Tfidf};
use std::collections::HashMap;

/// The metadata key holding [`TextClassifier::export`]'s JSON.
pub const PRIOR_METADATA: &str = "retune.classical";
/// The tensor holding its weights.
pub const PRIOR_TENSOR: &str = "retune_classical.weight";

const FORMAT: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    format: u32,
    labels: Vec<String>,
    temperature: f32,
    word_terms: Vec<String>,
    word_idf: Vec<f32>,
    char_terms: Vec<String>,
    char_idf: Vec<f32>,
}

fn terms_of(t: &Tfidf) -> Vec<String> {
    let mut terms: Vec<(&String, u32)> = t.vocab.iter().map(|(k, v)| (k, *v)).collect();
    terms.sort_unstable_by_key(|e| e.1);
    terms.into_iter().map(|e| e.0.clone()).collect()
}

fn block(
    what: &str,
    terms: Vec<String>,
    idf: Vec<f32>,
    analyzer: fn(&str) -> Vec<String>,
) -> Result<Tfidf, ClassicalError> {
    let bad = |why: String| ClassicalError::Stored(format!("{what} block: {why}"));
    if terms.len() != idf.len() {
        return Err(bad(format!(
            "{} terms against {} idf values",
            terms.len(),
            idf.len()
        )));
    }
    if idf.iter().any(|v| !v.is_finite() || *v <= 0.0) {
        return Err(bad("an idf value that is not finite and above 0".into()));
    }
    let n = terms.len();
    let vocab: HashMap<String, u32> = terms
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    if vocab.len() != n {
        return Err(bad("a term listed twice".into()));
    }
    Ok(Tfidf {
        vocab,
        idf,
        analyzer,
    })
}

impl TextClassifier {
    /// The classifier as JSON (labels, temperature, vocabularies, idf) and its
    /// weights, `[labels, features + 1]` row-major.
    pub fn export(&self) -> (String, Vec<f32>) {
        let s = Stored {
            format: FORMAT,
            labels: self.labels.clone(),
            temperature: self.temperature,
            word_terms: terms_of(&self.features.word),
            word_idf: self.features.word.idf.clone(),
            char_terms: terms_of(&self.features.chars),
            char_idf: self.features.chars.idf.clone(),
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        (json, self.weights.concat())
    }

    /// The classifier [`Self::export`] wrote; anything that does not hold
    /// together (lengths, non-finite values, an unknown format) is refused.
    pub fn import(json: &str, weights: &[f32]) -> Result<Self, ClassicalError> {
        let s: Stored = serde_json::from_str(json)
            .map_err(|e| ClassicalError::Stored(format!("its description: {e}")))?;
        if s.format != FORMAT {
            return Err(ClassicalError::Stored(format!(
                "format {} (this build reads {FORMAT})",
                s.format
            )));
        }
        if s.labels.len() < 2 {
            return Err(ClassicalError::Stored(format!(
                "{} labels (at least 2)",
                s.labels.len()
            )));
        }
        if !s.temperature.is_finite() || s.temperature <= 0.0 {
            return Err(ClassicalError::Stored(format!(
                "temperature {} (finite, above 0)",
                s.temperature
            )));
        }
        let features = Features {
            word: block("the word", s.word_terms, s.word_idf, word_ngrams)?,
            chars: block("the character", s.char_terms, s.char_idf, char_wb_ngrams)?,
        };
        let row = features.len() + 1;
        if weights.len() != s.labels.len() * row {
            return Err(ClassicalError::Stored(format!(
                "{} weights for {} labels × {row}",
                weights.len(),
                s.labels.len()
            )));
        }
        if weights.iter().any(|v| !v.is_finite()) {
            return Err(ClassicalError::Stored("a weight that is not finite".into()));
        }
        Ok(Self {
            features,
            labels: s.labels,
            weights: weights.chunks(row).map(<[f32]>::to_vec).collect(),
            skipped_labels: Vec::new(),
            temperature: s.temperature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClassicalOptions;

    #[test]
    fn a_stored_classifier_scores_as_the_trained_one_and_damage_is_refused() {
        let texts = [
            "card lost",
            "lost my card",
            "my card was stolen",
            "someone took my card",
            "i cannot find my card",
            "card gone missing",
            "top up failed",
            "topup failed again",
            "why did my top-up fail",
            "the top up did not work",
            "could not top up",
            "top-up declined",
        ];
        let labels = [&["lost"; 6][..], &["topup"; 6][..]].concat();
        let o = ClassicalOptions::default();
        let c = TextClassifier::train_calibrated(&texts, &labels, 3, &o).unwrap();
        let (json, w) = c.export();
        let back = TextClassifier::import(&json, &w).unwrap();
        assert_ne!(c.temperature(), 1.0, "calibrated on 3 folds");
        for t in ["i lost it", "top up", "nothing known here", ""] {
            assert_eq!(c.scores(t), back.scores(t), "{t}");
            assert_eq!(c.log_probs(t), back.log_probs(t), "{t}");
        }
        assert_eq!(back.temperature(), c.temperature());
        assert!(TextClassifier::import(&json, &w[1..]).is_err());
        let mut nan = w.clone();
        nan[3] = f32::NAN;
        assert!(TextClassifier::import(&json, &nan).is_err());
        let other = json.replace("\"format\":1", "\"format\":2");
        let e = TextClassifier::import(&other, &w).unwrap_err();
        assert!(e.to_string().contains("format 2"), "{e}");
        assert!(TextClassifier::import("{", &w).is_err());
    }
}
