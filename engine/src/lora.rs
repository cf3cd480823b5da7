//! Per-row LoRA: after a base projection ran once for the whole batch, each
//! token whose sequence has an adapter for this (layer, module) gets
//! `s · B (A x)` added. Tokens are grouped by adapter, so each distinct adapter's
//! weights are read once per step; base-only rows cost nothing. Every delta is
//! computed per token with fixed-order dot products, so a row's output does not
//! depend on what else is in the batch.

use crate::linear::rows_times_tokens;
use rayon::prelude::*;
use retune_adapters::LoraAdapter;

/// A contiguous run of batch tokens and the adapter they use.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<&'a LoraAdapter>,
}

/// `out` is `[t, rows]`, `x` is `[t, cols]`.
pub fn add_deltas(
    spans: &[Span<'_>],
    layer: usize,
    module: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
    rows: usize,
) {
    // group token indices by adapter identity
    let mut groups: Vec<(&LoraAdapter, Vec<usize>)> = Vec::new();
    for s in spans {
        let Some(a) = s.adapter else { continue };
        if a.pair(layer, module).is_none() {
            continue;
        }
        let toks = s.start..s.start + s.len;
        match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, a)) {
            Some((_, v)) => v.extend(toks),
            None => groups.push((a, toks.collect())),
        }
    }
    for (adapter, toks) in groups {
        let Some(p) = adapter.pair(layer, module) else {
            continue;
        };
        let n = toks.len();
        // shrink: xa = A x for this group's tokens
        let mut xs = Vec::with_capacity(n * cols);
        for &t in &toks {
            xs.extend_from_slice(&x[t * cols..(t + 1) * cols]);
        }
        let mut xa = vec![0f32; n * p.rank];
        let a_rows: Vec<&[f32]> = p.a.chunks_exact(cols).collect();
        for chunk in (0..p.rank).step_by(4) {
            let rws = &a_rows[chunk..(chunk + 4).min(p.rank)];
            rows_times_tokens(rws, &xs, cols, n, |ri, ti, v| {
                xa[ti * p.rank + chunk + ri] = v
            });
        }
        // expand: out += s · B xa, parallel over output rows
        let b_rows: Vec<&[f32]> = p.b.chunks_exact(p.rank).collect();
        let chunk_rows = 64;
        let deltas: Vec<(usize, Vec<f32>)> = (0..rows)
            .step_by(chunk_rows)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|r0| {
                let r1 = (r0 + chunk_rows).min(rows);
                let mut d = vec![0f32; n * (r1 - r0)];
                for r in (r0..r1).step_by(4) {
                    let rws = &b_rows[r..(r + 4).min(r1)];
                    rows_times_tokens(rws, &xa, p.rank, n, |ri, ti, v| {
                        d[ti * (r1 - r0) + r - r0 + ri] = v
                    });
                }
                (r0, d)
            })
            .collect();
        for (r0, d) in deltas {
            let w = d.len() / n;
            for (i, &t) in toks.iter().enumerate() {
                let o = &mut out[t * rows + r0..t * rows + r0 + w];
                for (oo, dd) in o.iter_mut().zip(&d[i * w..(i + 1) * w]) {
                    *oo += p.scale * dd;
                }
            }
        }
    }
}
