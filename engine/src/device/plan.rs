use super::{DeviceKv, DeviceModel};
use crate::error::{EngineError, Result};
use crate::model::BatchItem;
use candle_core::Tensor;

/// Which device adapter slots a step uses.
pub(super) enum SlotSel {
    /// `n_ad` consecutive slots from this one (a view of the slab)
    Run(usize),
    Gather(Tensor),
}

pub(super) struct LoraPlan {
    pub(super) n_ad: usize,
    pub(super) gmax: usize,
    /// `[n_ad * gmax]` token row per grouped row; `None` = the batch order already is
    pub(super) gather: Option<Tensor>,
    /// `[t]` grouped row per token (`n_ad * gmax` = no adapter: a zero row)
    pub(super) scatter: Option<Tensor>,
    pub(super) slots: SlotSel,
}

impl DeviceModel {
    /// Upload (or find) each distinct adapter of the batch; returns per item its
    /// group index into the returned slot list.
    pub(super) fn adapter_groups(
        &self,
        items: &[BatchItem<'_, DeviceKv>],
    ) -> Result<(Vec<Option<usize>>, Vec<usize>)> {
        let mut st = self
            .adapters
            .lock()
            .map_err(|_| EngineError::InvalidRequest("adapter slot table poisoned".into()))?;
        st.step += 1;
        let step = st.step;
        let mut ids: Vec<u64> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        let mut group = Vec::with_capacity(items.len());
        for it in items {
            let Some(a) = it.adapter else {
                group.push(None);
                continue;
            };
            if let Some(g) = ids.iter().position(|&i| i == a.id()) {
                group.push(Some(g));
                continue;
            }
            let slot = match st.map.get_mut(&a.id()) {
                Some(e) => {
                    e.1 = step;
                    e.0
                }
                None => {
                    let slot = match st.free.pop() {
                        Some(s) => s,
                        None => {
                            // evict the least recently used adapter not in this step
                            let victim = st
                                .map
                                .iter()
                                .filter(|(_, (_, used))| *used < step)
                                .min_by_key(|(_, (_, used))| *used)
                                .map(|(id, (s, _))| (*id, *s));
                            let Some((vid, vs)) = victim else {
                                return Err(EngineError::InvalidRequest(format!(
                                    "more distinct adapters in one step than the {} device adapter slots",
                                    st.map.len()
                                )));
                            };
                            st.map.remove(&vid);
                            vs
                        }
                    };
                    self.upload(a, slot)?;
                    st.uploads += 1;
                    st.map.insert(a.id(), (slot, step));
                    slot
                }
            };
            ids.push(a.id());
            slots.push(slot);
            group.push(Some(ids.len() - 1));
        }
        Ok((group, slots))
    }
}
