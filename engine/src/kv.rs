//! Per-sequence KV cache: one growable buffer per layer for K and for V,
//! `[position, kv_heads * head_dim]`. Dropping the cache frees its memory.

pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
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
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        let need = (self.len + n) * self.kv_dim;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            if b.capacity() < need {
                // grow in steps of 64 positions to avoid reallocating every token
                let target = (self.len + n).div_ceil(64) * 64 * self.kv_dim;
                b.reserve_exact(target - b.len());
            }
        }
    }

    /// Append rows for `layer` (positions `len..len+n`, not yet committed).
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let start = self.len * self.kv_dim;
        self.k[layer].truncate(start);
        self.v[layer].truncate(start);
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}
