//! Length-bucketed batches: each epoch shuffles the examples (from the seed),
//! sorts windows of `BUCKET_BATCHES` batches by length, cuts them into batches
//! and shuffles the batch order, so a batch pads to lengths close to its own and
//! the order is still random. A pure function of (examples, seed, epoch): resume
//! rebuilds the same batches.

use crate::examples::Encoded;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use retune_engine::TrainBatch;

const BUCKET_BATCHES: usize = 16;

/// Indices of one epoch's batches.
pub fn epoch_batches(lengths: &[usize], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (epoch + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut out = Vec::new();
    for window in idx.chunks(batch * BUCKET_BATCHES) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| (lengths[i], i));
        out.extend(w.chunks(batch).map(<[usize]>::to_vec));
    }
    out.shuffle(&mut rng);
    out
}

/// One micro-batch as the engine's padded rows plus the loss rows: logits at
/// stream row `batch.row(b, i - 1)` predict `tokens[i]` with its weight.
pub struct MicroBatch {
    pub batch: TrainBatch,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// real (unpadded) tokens
    pub tokens: usize,
}

impl MicroBatch {
    /// The batch, its shared prefix computed once.
    pub fn new(examples: &[&Encoded], pad: u32) -> Self {
        Self::build(examples, pad, true)
    }

    /// The batch with every row computed whole (to check the shared prefix
    /// against).
    pub fn unshared(examples: &[&Encoded], pad: u32) -> Self {
        Self::build(examples, pad, false)
    }

    fn build(examples: &[&Encoded], pad: u32, share: bool) -> Self {
        let len = examples
            .iter()
            .map(|e| e.tokens.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tokens = Vec::with_capacity(examples.len() * len);
        for e in examples {
            tokens.extend_from_slice(&e.tokens);
            tokens.extend(std::iter::repeat(pad).take(len - e.tokens.len()));
        }
        let lens: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
        let prefix = if share {
            TrainBatch::shared_prefix(&tokens, len, &lens)
        } else {
            0
        };
        let batch = TrainBatch {
            tokens,
            batch: examples.len(),
            len,
            prefix,
        };
        let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        let mut real = 0;
        for (b, e) in examples.iter().enumerate() {
            real += e.tokens.len();
            if let Some(c) = e.class {
                // the head reads the last prompt token
                rows.push(batch.row(b, e.tokens.len() - 1) as u32);
                targets.push(c);
                weights.push(1.0);
                continue;
            }
            for i in 1..e.tokens.len() {
                if e.weights[i] > 0.0 {
                    rows.push(batch.row(b, i - 1) as u32);
                    targets.push(e.tokens[i]);
                    weights.push(e.weights[i]);
                }
            }
        }
        Self {
            batch,
            rows,
            targets,
            weights,
            tokens: real,
        }
    }

    pub fn weight(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }
}
