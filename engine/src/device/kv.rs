use super::DeviceModel;
use crate::error::{EngineError, Result};
use std::sync::{Arc, Mutex};

/// A sequence's KV slot on the device. Dropping it frees the slot.
#[derive(Debug)]
pub struct DeviceKv {
    pub(super) slot: usize,
    pub(super) len: usize,
    pub(super) bytes_per_pos: usize,
    pub(super) free: Arc<Mutex<Vec<usize>>>,
}

impl DeviceKv {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of slab this sequence's positions occupy.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_pos
    }
}

impl Drop for DeviceKv {
    fn drop(&mut self) {
        if let Ok(mut f) = self.free.lock() {
            f.push(self.slot);
        }
    }
}

impl DeviceModel {
    /// Take a free KV slot for a new sequence.
    pub fn new_cache(&self) -> Result<DeviceKv> {
        let slot = self
            .free_slots
            .lock()
            .map_err(|_| EngineError::InvalidRequest("kv slot list poisoned".into()))?
            .pop()
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "all {} device KV slots are in use",
                    self.slots
                ))
            })?;
        let c = &self.cfg;
        Ok(DeviceKv {
            slot,
            len: 0,
            bytes_per_pos: 2 * c.n_layer * c.kv_dim() * self.kv_dtype.size_in_bytes(),
            free: self.free_slots.clone(),
        })
    }

    pub(super) fn slot_row(&self, slot: usize, head: usize, pos: usize) -> usize {
        (slot * self.cfg.n_kv_head + head) * self.cfg.context + pos
    }
}
