//! The cheapest baseline a label task has: a classical text classifier, trained
//! in seconds, that a fine-tune must beat (the gate's classical arm) and whose
//! out-of-fold predictions find suspect labels before training.
//!
//! Features are scikit-learn's `TfidfVectorizer(analyzer="word", ngram_range=(1, 2),
//! sublinear_tf=True)` beside `TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
//! sublinear_tf=True)` in a `FeatureUnion` (each block L2-normalised, smooth idf);
//! the classifier is `LinearSVC` (one-vs-rest, L2-regularised squared hinge with an
//! intercept, solved in the dual by coordinate descent with shrinking as liblinear
//! does). Checked against scikit-learn on a committed fixture
//! (`datasets/tests/classical.rs`). Written here, not taken from linfa or
//! smartcore: both train on dense matrices, and Banking77's 9,000 rows × 42,000
//! features would be 3 GB dense against 12 MB sparse.

use std::collections::HashMap;

mod stored;
pub use stored::{PRIOR_METADATA, PRIOR_TENSOR};

/// Why a classifier could not be trained; the gate puts it in its report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClassicalError {
    #[error(
        "the classical arm needs at least 2 labels with {min} or more training rows each; {have}"
    )]
    TooFewLabels { min: usize, have: String },
    #[error("texts and labels differ in number ({texts} against {labels})")]
    Mismatch { texts: usize, labels: usize },
    /// A stored classifier (see [`TextClassifier::import`]) that does not hold together.
    #[error("the stored classical classifier is damaged: {0}")]
    Stored(String),
}

fn same_len(texts: &[&str], labels: &[&str]) -> Result<(), ClassicalError> {
    if texts.len() == labels.len() {
        return Ok(());
    }
    Err(ClassicalError::Mismatch {
        texts: texts.len(),
        labels: labels.len(),
    })
}

/// A training row needs at least this many rows of its label to be learnt.
pub const MIN_ROWS_PER_LABEL: usize = 2;

/// Settings of [`TextClassifier::train`].
#[derive(Clone, Debug)]
pub struct ClassicalOptions {
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub c: f64,
    /// Stopping tolerance on the projected gradient (liblinear's `eps`).
    pub tol: f64,
    pub max_iter: usize,
    /// Seeds the coordinate order.
    pub seed: u64,
    /// Threads for the one-vs-rest problems.
    pub threads: usize,
}

impl Default for ClassicalOptions {
    fn default() -> Self {
        // C = 1: on 1,000 held-out Banking77 rows, scikit-learn's LinearSVC scores
        // 91.2% with C 0.3 and 1, 91.3% with C 3 (LogisticRegression C=10: 91.0%)
        Self {
            c: 1.0,
            tol: 1e-4,
            max_iter: 1000,
            seed: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A sparse row: (feature, value), features ascending.
pub type SparseRow = Vec<(u32, f32)>;

/// scikit-learn's `lower()` then `(?u)\b\w\w+\b`: maximal runs of word
/// characters, two or more long.
fn word_tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut n = 0;
    for c in lower.chars() {
        if c.is_alphanumeric() || c == '_' {
            cur.push(c);
            n += 1;
        } else {
            if n >= 2 {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
            n = 0;
        }
    }
    if n >= 2 {
        out.push(cur);
    }
    out
}

/// Word 1- and 2-grams, as scikit-learn's `_word_ngrams`.
fn word_ngrams(text: &str) -> Vec<String> {
    let toks = word_tokens(text);
    let mut out = toks.clone();
    for w in toks.windows(2) {
        out.push(format!("{} {}", w[0], w[1]));
    }
    out
}

/// Character 2- to 5-grams inside word boundaries, as scikit-learn's
/// `_char_wb_ngrams` (each word padded with one space on each side; a word
/// shorter than n counts once, whole).
fn char_wb_ngrams(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    for word in lower.split_whitespace() {
        let w: Vec<char> = std::iter::once(' ')
            .chain(word.chars())
            .chain(std::iter::once(' '))
            .collect();
        for n in 2..=5 {
            let mut offset = 0;
            out.push(w[offset..(offset + n).min(w.len())].iter().collect());
            while offset + n < w.len() {
                offset += 1;
                out.push(w[offset..offset + n].iter().collect());
            }
            if offset == 0 {
                break;
            }
        }
    }
    out
}

/// One TF-IDF block: vocabulary and idf learnt from the training texts.
#[derive(Clone, Debug)]
struct Tfidf {
    vocab: HashMap<String, u32>,
    idf: Vec<f32>,
    analyzer: fn(&str) -> Vec<String>,
}

impl Tfidf {
    fn fit(texts: &[&str], analyzer: fn(&str) -> Vec<String>) -> Self {
        let mut df: HashMap<String, u32> = HashMap::new();
        for t in texts {
            let mut terms = analyzer(t);
            terms.sort_unstable();
            terms.dedup();
            for term in terms {
                *df.entry(term).or_default() += 1;
            }
        }
        // scikit-learn numbers terms in sorted order
        let mut terms: Vec<(String, u32)> = df.into_iter().collect();
        terms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let n = texts.len() as f64;
        let idf = terms
            .iter()
            .map(|(_, d)| (((1.0 + n) / (1.0 + *d as f64)).ln() + 1.0) as f32)
            .collect();
        let vocab = terms
            .into_iter()
            .enumerate()
            .map(|(i, (t, _))| (t, i as u32))
            .collect();
        Self {
            vocab,
            idf,
            analyzer,
        }
    }

    fn len(&self) -> usize {
        self.idf.len()
    }

    /// Sublinear tf × idf, L2-normalised; terms not in the vocabulary are ignored.
    fn transform(&self, text: &str, offset: u32, out: &mut SparseRow) {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for term in (self.analyzer)(text) {
            if let Some(&i) = self.vocab.get(&term) {
                *counts.entry(i).or_default() += 1;
            }
        }
        let mut row: Vec<(u32, f64)> = counts
            .into_iter()
            .map(|(i, c)| (i, (1.0 + (c as f64).ln()) * self.idf[i as usize] as f64))
            .collect();
        row.sort_unstable_by_key(|e| e.0);
        let norm = row.iter().map(|e| e.1 * e.1).sum::<f64>().sqrt();
        if norm > 0.0 {
            out.extend(
                row.into_iter()
                    .map(|(i, v)| (i + offset, (v / norm) as f32)),
            );
        }
    }
}

/// The features: the word block, then the character block.
#[derive(Clone, Debug)]
pub struct Features {
    word: Tfidf,
    chars: Tfidf,
}

impl Features {
    pub fn fit(texts: &[&str]) -> Self {
        Self {
            word: Tfidf::fit(texts, word_ngrams),
            chars: Tfidf::fit(texts, char_wb_ngrams),
        }
    }

    /// Number of features (without the intercept).
    pub fn len(&self) -> usize {
        self.word.len() + self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn transform(&self, text: &str) -> SparseRow {
        let mut row = Vec::new();
        self.word.transform(text, 0, &mut row);
        self.chars.transform(text, self.word.len() as u32, &mut row);
        row
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn dot(w: &[f64], x: &SparseRow, bias: f64) -> f64 {
    x.iter()
        .map(|&(i, v)| w[i as usize] * v as f64)
        .sum::<f64>()
        + bias
}

/// One binary L2-regularised squared-hinge SVM with an intercept (its feature
/// is the constant 1, regularised as liblinear's), solved in the dual by
/// coordinate descent with shrinking (Hsieh et al. 2008; liblinear's
/// `solve_l2r_l1l2_svc` for the L2 loss). Returns the weights, the intercept last.
fn binary_svm(
    rows: &[SparseRow],
    y: &[f64],
    dim: usize,
    o: &ClassicalOptions,
    seed: u64,
) -> Vec<f64> {
    let l = rows.len();
    let diag = 0.5 / o.c;
    let mut w = vec![0f64; dim + 1];
    let mut alpha = vec![0f64; l];
    let qd: Vec<f64> = rows
        .iter()
        .map(|x| diag + 1.0 + x.iter().map(|e| (e.1 as f64) * (e.1 as f64)).sum::<f64>())
        .collect();
    let mut index: Vec<usize> = (0..l).collect();
    let mut active = l;
    // (no upper bound on alpha for the L2 loss: only the max side shrinks)
    let mut pg_max_old = f64::INFINITY;
    let mut rng = seed;
    let mut iter = 0;
    while iter < o.max_iter {
        let (mut pg_max, mut pg_min) = (f64::NEG_INFINITY, f64::INFINITY);
        for i in 0..active {
            let j = i + (splitmix(&mut rng) % (active - i) as u64) as usize;
            index.swap(i, j);
        }
        let mut s = 0;
        while s < active {
            let i = index[s];
            let yi = y[i];
            let g = yi * dot(&w, &rows[i], w[dim]) - 1.0 + alpha[i] * diag;
            let mut pg = 0.0;
            if alpha[i] == 0.0 {
                if g > pg_max_old {
                    active -= 1;
                    index.swap(s, active);
                    continue;
                } else if g < 0.0 {
                    pg = g;
                }
            } else {
                pg = g;
            }
            pg_max = pg_max.max(pg);
            pg_min = pg_min.min(pg);
            if pg.abs() > 1e-12 {
                let old = alpha[i];
                alpha[i] = (alpha[i] - g / qd[i]).max(0.0);
                let d = (alpha[i] - old) * yi;
                for &(f, v) in &rows[i] {
                    w[f as usize] += d * v as f64;
                }
                w[dim] += d;
            }
            s += 1;
        }
        iter += 1;
        if pg_max - pg_min <= o.tol {
            if active == l {
                break;
            }
            active = l;
            pg_max_old = f64::INFINITY;
            continue;
        }
        pg_max_old = if pg_max <= 0.0 { f64::INFINITY } else { pg_max };
    }
    w
}

/// A trained classifier: TF-IDF features and one linear scorer per label.
#[derive(Clone, Debug)]
pub struct TextClassifier {
    features: Features,
    labels: Vec<String>,
    /// Per label: weights over the features, the intercept last.
    weights: Vec<Vec<f32>>,
    /// Labels left out for having fewer than [`MIN_ROWS_PER_LABEL`] rows.
    pub skipped_labels: Vec<String>,
    /// Scores become probabilities by a softmax at this temperature: 1 after
    /// [`Self::train`], fitted to out-of-fold scores by [`Self::train_calibrated`].
    temperature: f32,
}

impl TextClassifier {
    /// Train on `texts` with their `labels`. Labels with fewer than
    /// [`MIN_ROWS_PER_LABEL`] rows are left out (listed in `skipped_labels`);
    /// fewer than 2 labels left is an error.
    pub fn train(
        texts: &[&str],
        labels: &[&str],
        o: &ClassicalOptions,
    ) -> Result<Self, ClassicalError> {
        same_len(texts, labels)?;
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for l in labels {
            *counts.entry(l).or_default() += 1;
        }
        let (kept, skipped): (Vec<_>, Vec<_>) =
            counts.iter().partition(|(_, n)| **n >= MIN_ROWS_PER_LABEL);
        let skipped_labels: Vec<String> = skipped.iter().map(|(l, _)| l.to_string()).collect();
        if kept.len() < 2 {
            let have = match counts.len() {
                0 => "there are no rows".to_string(),
                1 => "every row has the same label".to_string(),
                _ => format!("{} of {} labels have enough", kept.len(), counts.len()),
            };
            return Err(ClassicalError::TooFewLabels {
                min: MIN_ROWS_PER_LABEL,
                have,
            });
        }
        let label_names: Vec<String> = kept.iter().map(|(l, _)| l.to_string()).collect();
        let keep: Vec<usize> = (0..texts.len())
            .filter(|&i| counts[labels[i]] >= MIN_ROWS_PER_LABEL)
            .collect();
        let kept_texts: Vec<&str> = keep.iter().map(|&i| texts[i]).collect();
        let features = Features::fit(&kept_texts);
        let rows: Vec<SparseRow> = kept_texts.iter().map(|t| features.transform(t)).collect();
        let dim = features.len();
        let class_of: HashMap<&str, usize> = label_names
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        let y_class: Vec<usize> = keep.iter().map(|&i| class_of[labels[i]]).collect();
        let k = label_names.len();
        let threads = o.threads.clamp(1, k);
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); k];
        std::thread::scope(|s| {
            let chunks: Vec<_> = (0..threads)
                .map(|t| {
                    let (rows, y_class) = (&rows, &y_class);
                    s.spawn(move || {
                        (t..k)
                            .step_by(threads)
                            .map(|c| {
                                let y: Vec<f64> = y_class
                                    .iter()
                                    .map(|&yc| if yc == c { 1.0 } else { -1.0 })
                                    .collect();
                                let w = binary_svm(rows, &y, dim, o, o.seed ^ (c as u64 + 1));
                                (c, w.into_iter().map(|v| v as f32).collect::<Vec<f32>>())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in chunks {
                // a panic in a worker is a bug here, not bad input: re-raise it
                for (c, w) in h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)) {
                    weights[c] = w;
                }
            }
        });
        Ok(Self {
            features,
            labels: label_names,
            weights,
            skipped_labels,
            temperature: 1.0,
        })
    }

    /// [`Self::train`] on every row, with the softmax temperature fitted to the
    /// given labels on `folds`-fold out-of-fold scores (as [`find_suspects`]
    /// does), so that [`Self::log_probs`] are calibrated probabilities. Rows
    /// too few for every fold to learn 2 labels keep the temperature 1.
    pub fn train_calibrated(
        texts: &[&str],
        labels: &[&str],
        folds: usize,
        o: &ClassicalOptions,
    ) -> Result<Self, ClassicalError> {
        let mut c = Self::train(texts, labels, o)?;
        if let Ok(oof) = OutOfFold::score(texts, labels, folds, o) {
            c.temperature = oof.temperature();
        }
        Ok(c)
    }

    /// Bytes its weights, idf and vocabularies hold (roughly: map overhead aside).
    pub fn bytes(&self) -> usize {
        let block = |t: &Tfidf| t.idf.len() * 8 + t.vocab.keys().map(String::len).sum::<usize>();
        self.weights.iter().map(|w| w.len() * 4).sum::<usize>()
            + block(&self.features.word)
            + block(&self.features.chars)
    }

    /// The softmax temperature of [`Self::log_probs`].
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Log-probability of each label (in [`Self::labels`] order): a softmax of
    /// the scores at [`Self::temperature`].
    pub fn log_probs(&self, text: &str) -> Vec<f32> {
        log_softmax(&self.scores(text), self.temperature)
    }

    /// The labels it chooses among (sorted).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The features of `text`.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// One decision score per label (in [`Self::labels`] order).
    pub fn scores(&self, text: &str) -> Vec<f32> {
        let x = self.features.transform(text);
        let dim = self.features.len();
        self.weights
            .iter()
            .map(|w| x.iter().map(|&(i, v)| w[i as usize] * v).sum::<f32>() + w[dim])
            .collect()
    }

    /// The likeliest label of `text`.
    pub fn predict(&self, text: &str) -> &str {
        let s = self.scores(text);
        let best = s
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        &self.labels[best]
    }
}

/// A training row whose given label the classifier, not trained on it,
/// confidently puts elsewhere.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Suspect {
    /// The row's position in the input.
    pub index: usize,
    pub given: String,
    pub suggested: String,
    /// The out-of-fold probability of the suggested label…
    pub suggested_p: f32,
    /// …and of the given one.
    pub given_p: f32,
}

/// What [`find_suspects`] found.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SuspectReport {
    pub rows: usize,
    pub folds: usize,
    /// The softmax temperature fitted to the out-of-fold scores.
    pub temperature: f32,
    /// Out-of-fold accuracy of the classifier against the given labels.
    pub oof_accuracy: f32,
    pub suspects: Vec<Suspect>,
}

/// Log-softmax of `scores` at temperature `t` (a label scored `-inf` gets `-inf`).
pub fn log_softmax(scores: &[f32], t: f32) -> Vec<f32> {
    let m = scores.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    if !m.is_finite() {
        return vec![f32::NEG_INFINITY; scores.len()];
    }
    let z = scores.iter().map(|v| ((v - m) * t).exp()).sum::<f32>().ln();
    scores.iter().map(|v| (v - m) * t - z).collect()
}

/// Every row scored by a classifier trained on the other folds.
struct OutOfFold<'a> {
    /// Every label, sorted.
    names: Vec<&'a str>,
    /// Per row, a score per label of `names` (`-inf` for a label its fold's
    /// classifier did not learn).
    scores: Vec<Vec<f32>>,
    /// Each row's label, as an index into `names`.
    given: Vec<usize>,
    folds: usize,
}

impl<'a> OutOfFold<'a> {
    fn score(
        texts: &[&str],
        labels: &[&'a str],
        folds: usize,
        o: &ClassicalOptions,
    ) -> Result<Self, ClassicalError> {
        same_len(texts, labels)?;
        let folds = folds.max(2);
        let mut names: Vec<&str> = labels.to_vec();
        names.sort_unstable();
        names.dedup();
        let k = names.len();
        let of: HashMap<&str, usize> = names.iter().enumerate().map(|(i, l)| (*l, i)).collect();
        let n = texts.len();
        // seeded fold of each row
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = o.seed ^ 0x5EED;
        for i in (1..n).rev() {
            let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut fold = vec![0usize; n];
        for (pos, &i) in order.iter().enumerate() {
            fold[i] = pos % folds;
        }
        let mut scores: Vec<Vec<f32>> = vec![vec![f32::NEG_INFINITY; k]; n];
        for f in 0..folds {
            let tr: Vec<usize> = (0..n).filter(|&i| fold[i] != f).collect();
            let c = TextClassifier::train(
                &tr.iter().map(|&i| texts[i]).collect::<Vec<_>>(),
                &tr.iter().map(|&i| labels[i]).collect::<Vec<_>>(),
                o,
            )?;
            let cols: Vec<usize> = c.labels().iter().map(|l| of[l.as_str()]).collect();
            for i in (0..n).filter(|&i| fold[i] == f) {
                for (s, &col) in c.scores(texts[i]).into_iter().zip(&cols) {
                    scores[i][col] = s;
                }
            }
        }
        let given: Vec<usize> = labels.iter().map(|l| of[l]).collect();
        Ok(Self {
            names,
            scores,
            given,
            folds,
        })
    }

    fn probs(&self, t: f32) -> Vec<Vec<f32>> {
        self.scores
            .iter()
            .map(|s| log_softmax(s, t).into_iter().map(f32::exp).collect())
            .collect()
    }

    /// The softmax temperature under which the given labels are likeliest.
    fn temperature(&self) -> f32 {
        let nll = |p: &[Vec<f32>]| -> f64 {
            p.iter()
                .zip(&self.given)
                .map(|(p, &g)| -(p[g].max(1e-12) as f64).ln())
                .sum::<f64>()
        };
        let mut temperature = 1.0f32;
        let mut best = f64::INFINITY;
        for t in [0.5f32, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0] {
            let v = nll(&self.probs(t));
            if v < best {
                best = v;
                temperature = t;
            }
        }
        temperature
    }
}

/// Suspect labels by confident learning (Northcutt, Jiang & Chuang 2021): every
/// row is scored by a classifier trained on the other `folds − 1` folds; the
/// scores become probabilities by a softmax whose temperature fits the given
/// labels best; a label's threshold is the mean probability of that label over
/// the rows that carry it; a row is suspect when the likeliest label at or above
/// its threshold is not the given one (an off-diagonal entry of the confident
/// joint). Rows of labels too rare to learn are never suspect.
pub fn find_suspects(
    texts: &[&str],
    labels: &[&str],
    folds: usize,
    o: &ClassicalOptions,
) -> Result<SuspectReport, ClassicalError> {
    let oof = OutOfFold::score(texts, labels, folds, o)?;
    let temperature = oof.temperature();
    let p = oof.probs(temperature);
    let (n, k, folds) = (texts.len(), oof.names.len(), oof.folds);
    let (names, given) = (&oof.names, &oof.given);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    };
    let oof_accuracy =
        (0..n).filter(|&i| argmax(&p[i]) == given[i]).count() as f32 / n.max(1) as f32;
    // per-label thresholds: mean self-probability of the rows carrying it
    let mut sum = vec![0f64; k];
    let mut cnt = vec![0usize; k];
    for i in 0..n {
        sum[given[i]] += p[i][given[i]] as f64;
        cnt[given[i]] += 1;
    }
    let learnt: Vec<bool> = cnt.iter().map(|&c| c >= MIN_ROWS_PER_LABEL).collect();
    let thresh: Vec<f32> = (0..k)
        .map(|j| {
            if cnt[j] > 0 {
                (sum[j] / cnt[j] as f64) as f32
            } else {
                1.0
            }
        })
        .collect();
    let mut suspects = Vec::new();
    for i in 0..n {
        if !learnt[given[i]] {
            continue;
        }
        let above = (0..k)
            .filter(|&j| learnt[j] && p[i][j] >= thresh[j])
            .max_by(|&a, &b| p[i][a].total_cmp(&p[i][b]));
        if let Some(j) = above {
            if j != given[i] {
                suspects.push(Suspect {
                    index: i,
                    given: labels[i].to_string(),
                    suggested: names[j].to_string(),
                    suggested_p: p[i][j],
                    given_p: p[i][given[i]],
                });
            }
        }
    }
    Ok(SuspectReport {
        rows: n,
        folds,
        temperature,
        oof_accuracy,
        suspects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyzers_follow_scikit_learn() {
        assert_eq!(
            word_tokens("I'm a Card-holder, 2x!"),
            vec!["card", "holder", "2x"]
        );
        assert_eq!(
            word_ngrams("my card is late"),
            vec!["my", "card", "is", "late", "my card", "card is", "is late"]
        );
        // " a " (3 chars): 2-grams " a", "a ", then the 3-gram " a " once; no more
        assert_eq!(char_wb_ngrams("a"), vec![" a", "a ", " a "]);
        let g = char_wb_ngrams("Hi  yo");
        assert!(g.contains(&" hi ".to_string()) && g.contains(&"yo ".to_string()));
        assert!(!g.iter().any(|t| t.contains("  ")));
    }

    #[test]
    fn too_few_labels_is_a_reason_not_a_crash() {
        let o = ClassicalOptions::default();
        let e = TextClassifier::train(&["a b", "c d"], &["x", "x"], &o).unwrap_err();
        assert!(e.to_string().contains("same label"), "{e}");
        let e = TextClassifier::train(&["a b", "c d", "e"], &["x", "x", "y"], &o).unwrap_err();
        assert!(e.to_string().contains("1 of 2 labels"), "{e}");
        let e = TextClassifier::train(&[], &[], &o).unwrap_err();
        assert!(e.to_string().contains("no rows"), "{e}");
        let c = TextClassifier::train(
            &[
                "card lost",
                "lost my card",
                "top up failed",
                "topup failed again",
                "z",
            ],
            &["lost", "lost", "topup", "topup", "rare"],
            &o,
        )
        .unwrap();
        assert_eq!(c.skipped_labels, vec!["rare"]);
        assert_eq!(c.predict("my card is lost"), "lost");
        assert_eq!(c.predict("the top up failed"), "topup");
    }
}
