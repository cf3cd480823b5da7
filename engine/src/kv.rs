//! Per-sequence KV cache: one growable buffer per layer for K and for V,
//! `[position, kv_heads * head_dim]`, stored as f16 (as llama.cpp does by
//! default; half the memory of f32). Dropping the cache frees its memory.

use half::f16;

#[derive(Clone)]
pub struct KvCache {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize) -> Self {
        Self {
            k: vec![Vec::new(); n_layer],
            v: vec![Vec::new(); n_layer],
            kv_dim,
            len: 0,
        }
    }

    /// Committed positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (capacity), for accounting.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 2).sum()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        let need = (self.len + n) * self.kv_dim;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            if b.capacity() < need {
                // grow geometrically (x1.25) in steps of 16 positions
                let positions = (self.len + n).max(b.capacity() / self.kv_dim * 5 / 4);
                let target = positions.div_ceil(16) * 16 * self.kv_dim;
                b.reserve_exact(target - b.len());
            }
        }
    }

    /// Append rows for `layer` (positions `len..len+n`, not yet committed).
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let start = self.len * self.kv_dim;
        self.k[layer].truncate(start);
        self.v[layer].truncate(start);
        self.k[layer].extend(k.iter().map(|x| f16::from_f32(*x)));
        self.v[layer].extend(v.iter().map(|x| f16::from_f32(*x)));
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Positions `start..start + n` of every layer, K then V per layer, appended
    /// to `out` (the prefix cache's block form).
    pub(crate) fn copy_out(&self, start: usize, n: usize, out: &mut Vec<f16>) {
        let (a, b) = (start * self.kv_dim, (start + n) * self.kv_dim);
        for (k, v) in self.k.iter().zip(&self.v) {
            out.extend_from_slice(&k[a..b]);
            out.extend_from_slice(&v[a..b]);
        }
    }

    /// A cache holding the positions of `blocks` in order, each `n` positions in
    /// the form [`Self::copy_out`] writes.
    pub(crate) fn from_blocks(n_layer: usize, kv_dim: usize, n: usize, blocks: &[&[f16]]) -> Self {
        let mut c = Self::new(n_layer, kv_dim);
        let per = n * kv_dim;
        c.reserve(n * blocks.len());
        for blk in blocks {
            for layer in 0..n_layer {
                let at = layer * 2 * per;
                c.k[layer].extend_from_slice(&blk[at..at + per]);
                c.v[layer].extend_from_slice(&blk[at + per..at + 2 * per]);
            }
        }
        c.len = n * blocks.len();
        c
    }
}
