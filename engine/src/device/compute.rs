use super::{DeviceKv, DeviceModel};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::model::{BatchItem, Model, ModelConfig};

/// What the scheduler runs: the native CPU engine or the tensor backend.
pub enum Compute {
    Host(Model),
    Device(DeviceModel),
}

impl From<Model> for Compute {
    /// The host backend, its kernels prepared ([`Model::prepare_kernels`]).
    fn from(mut m: Model) -> Self {
        m.prepare_kernels();
        Self::Host(m)
    }
}

impl From<DeviceModel> for Compute {
    fn from(m: DeviceModel) -> Self {
        Self::Device(m)
    }
}

/// A sequence's cache in whichever backend runs it.
pub enum Cache {
    Host(KvCache),
    Device(DeviceKv),
}

impl Cache {
    pub fn len(&self) -> usize {
        match self {
            Self::Host(c) => c.len(),
            Self::Device(c) => c.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        match self {
            Self::Host(c) => c.bytes(),
            Self::Device(c) => c.bytes(),
        }
    }
}

impl Compute {
    pub fn cfg(&self) -> &ModelConfig {
        match self {
            Self::Host(m) => &m.cfg,
            Self::Device(m) => &m.cfg,
        }
    }

    /// A copy of `c` for another sample of the same prompt; `None` where the
    /// backend cannot copy one (a device slot): that sample prefills anew.
    pub fn fork_cache(&self, c: &Cache) -> Option<Cache> {
        match c {
            Cache::Host(k) => Some(Cache::Host(k.clone())),
            Cache::Device(_) => None,
        }
    }

    pub fn new_cache(&self) -> Result<Cache> {
        Ok(match self {
            Self::Host(m) => Cache::Host(m.new_cache()),
            Self::Device(m) => Cache::Device(m.new_cache()?),
        })
    }

    /// Concurrent sequences the backend can hold (`None` = limited by memory only).
    pub fn max_sequences(&self) -> Option<usize> {
        match self {
            Self::Host(_) => None,
            Self::Device(m) => Some(m.slots()),
        }
    }

    /// Distinct adapters one forward step can run (`None`: any number).
    pub fn max_step_adapters(&self) -> Option<usize> {
        match self {
            Self::Host(_) => None,
            Self::Device(m) => Some(m.adapter_slots()),
        }
    }

    /// Whether this backend can run `a` (a device's adapter slots have a fixed
    /// rank); the message says why not.
    pub fn check_adapter(
        &self,
        a: &retune_adapters::LoraAdapter,
    ) -> std::result::Result<(), String> {
        let layers = self.cfg().n_layer;
        if a.layers.len() != layers {
            return Err(format!(
                "adapter has {} layers, the model {layers}",
                a.layers.len()
            ));
        }
        if let Self::Device(m) = self {
            let rank = a
                .layers
                .iter()
                .flatten()
                .flatten()
                .map(|p| p.rank)
                .max()
                .unwrap_or(0);
            if rank > m.max_rank() {
                return Err(format!(
                    "adapter rank {rank} exceeds this device's max_rank {}",
                    m.max_rank()
                ));
            }
        }
        Ok(())
    }

    pub fn forward(&self, items: &mut [BatchItem<'_, Cache>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Host(m) => m.forward(&mut view(items, |c| match c {
                Cache::Host(kv) => Some(kv),
                Cache::Device(_) => None,
            })?),
            Self::Device(m) => m.forward(&mut view(items, |c| match c {
                Cache::Device(kv) => Some(kv),
                Cache::Host(_) => None,
            })?),
        }
    }
}

/// The batch with each item's cache narrowed to one backend's type.
fn view<'a, 'b, C>(
    items: &'a mut [BatchItem<'b, Cache>],
    pick: impl Fn(&'a mut Cache) -> Option<&'a mut C>,
) -> Result<Vec<BatchItem<'a, C>>> {
    items
        .iter_mut()
        .map(|it| {
            Ok(BatchItem {
                tokens: it.tokens,
                adapter: it.adapter,
                want_logits: it.want_logits,
                kv: pick(&mut *it.kv).ok_or_else(|| {
                    EngineError::InvalidRequest("cache from another backend".into())
                })?,
            })
        })
        .collect()
}
