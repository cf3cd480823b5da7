//! Per-row LoRA: after a base projection ran once for the whole batch, each
//! token whose sequence has an adapter for this (layer, module) gets
//! `s · B (A x)` added. Tokens are grouped by adapter, so each distinct adapter's
//! weights are read once per step; base-only rows cost nothing. Every delta is
//! computed per token with fixed-order dot products, so a row's output does not
//! depend on what else is in the batch.

use crate::kernels_f32::Kernels;
use crate::linear::rows_times_tokens;
use retune_adapters::{LoraAdapter, LoraPair};

/// A contiguous run of batch tokens and the adapter they use.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<&'a LoraAdapter>,
}

/// Output rows per expand job.
const EXPAND_ROWS: usize = 128;

/// `out` is `[t, rows]`, `x` is `[t, cols]`; on the kernels of path `k`.
#[allow(clippy::too_many_arguments)]
pub fn add_deltas(
    k: Kernels,
    spans: &[Span<'_>],
    layer: usize,
    module: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
    rows: usize,
) {
    // group token indices by adapter identity
    let mut groups: Vec<(&LoraPair, usize, Vec<usize>)> = Vec::new();
    for s in spans {
        let Some(a) = s.adapter else { continue };
        let Some(pair) = a.pair(layer, module) else {
            continue;
        };
        let toks = s.start..s.start + s.len;
        let id = a as *const LoraAdapter as usize; // identity of the loaded adapter
        match groups.iter_mut().find(|(_, g, _)| *g == id) {
            Some((_, _, v)) => v.extend(toks),
            None => groups.push((pair, id, toks.collect())),
        }
    }
    if groups.is_empty() {
        return;
    }
    // shrink, one job per adapter: xa = A x over its tokens
    let shrunk: Vec<Vec<f32>> = crate::team::map(groups.len(), |g| {
        let (p, _, toks) = &groups[g];
        let xs: Vec<f32> = toks
            .iter()
            .flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied())
            .collect();
        let mut xa = vec![0f32; toks.len() * p.rank];
        let a_rows: Vec<&[f32]> = p.a.chunks_exact(cols).collect();
        for r0 in (0..p.rank).step_by(4) {
            let rws = &a_rows[r0..(r0 + 4).min(p.rank)];
            rows_times_tokens(k, rws, &xs, cols, toks.len(), |ri, ti, v| {
                xa[ti * p.rank + r0 + ri] = v
            });
        }
        xa
    });
    // expand, one job per (adapter, block of output rows): d = B xa
    let jobs: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..rows).step_by(EXPAND_ROWS).map(move |r| (g, r)))
        .collect();
    let deltas: Vec<Vec<f32>> = crate::team::map(jobs.len(), |j| {
        let (g, r0) = jobs[j];
        let (p, _, toks) = &groups[g];
        let r1 = (r0 + EXPAND_ROWS).min(rows);
        let w = r1 - r0;
        let mut d = vec![0f32; toks.len() * w];
        let b_rows: Vec<&[f32]> = p.b[r0 * p.rank..r1 * p.rank].chunks_exact(p.rank).collect();
        for r in (0..w).step_by(4) {
            let rws = &b_rows[r..(r + 4).min(w)];
            rows_times_tokens(k, rws, &shrunk[g], p.rank, toks.len(), |ri, ti, v| {
                d[ti * w + r + ri] = v
            });
        }
        d
    });
    for (&(g, r0), d) in jobs.iter().zip(&deltas) {
        let (p, _, toks) = &groups[g];
        let w = d.len() / toks.len();
        for (i, &t) in toks.iter().enumerate() {
            let o = &mut out[t * rows + r0..t * rows + r0 + w];
            for (oo, dd) in o.iter_mut().zip(&d[i * w..(i + 1) * w]) {
                *oo += p.scale * dd;
            }
        }
    }
}

/// A classifier adapter's scores over its labels for one final-norm hidden row:
/// `weight · x` (the head's rows in label order). Both backends call this, so a
/// label's score is the same sum everywhere.
pub fn class_logits(head: &retune_adapters::ClassHead, x: &[f32]) -> Vec<f32> {
    head.weight
        .chunks_exact(head.hidden)
        .map(|row| row.iter().zip(x).map(|(w, v)| w * v).sum())
        .collect()
}
