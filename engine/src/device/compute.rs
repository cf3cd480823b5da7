use super::{DeviceKv, DeviceModel};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::model::{BatchItem, Model, ModelConfig};
use crate::prefix::{PrefixCache, PrefixConfig};

/// What the scheduler runs: the native CPU engine ([`Model`]) or the tensor
/// backend ([`DeviceModel`]). Each narrows a sequence's [`Cache`] to its own.
pub trait Compute: Send {
    fn cfg(&self) -> &ModelConfig;

    fn new_cache(&self) -> Result<Cache>;

    /// A copy of `c` for another sample of the same prompt; `None` where the
    /// backend cannot copy one (a device slot): that sample prefills anew.
    fn fork_cache(&self, c: &Cache) -> Option<Cache>;

    /// Concurrent sequences the backend can hold (`None` = limited by memory only).
    fn max_sequences(&self) -> Option<usize> {
        None
    }

    /// Distinct adapters one forward step can run (`None`: any number).
    fn max_step_adapters(&self) -> Option<usize> {
        None
    }

    /// Whether this backend can run `a`; the message says why not.
    fn check_adapter(&self, a: &retune_adapters::LoraAdapter) -> std::result::Result<(), String> {
        same_layers(self.cfg(), a)
    }

    fn forward(&self, items: &mut [BatchItem<'_, Cache>]) -> Result<Vec<Vec<f32>>>;

    /// A prefix cache over this backend's KV, where it can copy KV (the host's).
    fn prefix_cache(&self, _cfg: &PrefixConfig) -> Option<PrefixCache> {
        None
    }
}

fn same_layers(
    cfg: &ModelConfig,
    a: &retune_adapters::LoraAdapter,
) -> std::result::Result<(), String> {
    let layers = cfg.n_layer;
    if a.layers.len() != layers {
        return Err(format!(
            "adapter has {} layers, the model {layers}",
            a.layers.len()
        ));
    }
    Ok(())
}

impl From<Model> for Box<dyn Compute> {
    /// The host backend, its kernels prepared ([`Model::prepare_kernels`]).
    fn from(mut m: Model) -> Self {
        m.prepare_kernels();
        Box::new(m)
    }
}

impl From<DeviceModel> for Box<dyn Compute> {
    fn from(m: DeviceModel) -> Self {
        Box::new(m)
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

impl Compute for Model {
    fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }

    fn new_cache(&self) -> Result<Cache> {
        Ok(Cache::Host(Model::new_cache(self)))
    }

    fn fork_cache(&self, c: &Cache) -> Option<Cache> {
        match c {
            Cache::Host(k) => Some(Cache::Host(k.clone())),
            Cache::Device(_) => None,
        }
    }

    fn forward(&self, items: &mut [BatchItem<'_, Cache>]) -> Result<Vec<Vec<f32>>> {
        Model::forward(
            self,
            &mut view(items, |c| match c {
                Cache::Host(kv) => Some(kv),
                Cache::Device(_) => None,
            })?,
        )
    }

    fn prefix_cache(&self, cfg: &PrefixConfig) -> Option<PrefixCache> {
        Some(PrefixCache::new(
            cfg.clone(),
            &self.fingerprint(),
            self.cfg.n_layer,
            self.cfg.kv_dim(),
        ))
        .filter(PrefixCache::enabled)
    }
}

impl Compute for DeviceModel {
    fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }

    fn new_cache(&self) -> Result<Cache> {
        Ok(Cache::Device(DeviceModel::new_cache(self)?))
    }

    fn fork_cache(&self, _: &Cache) -> Option<Cache> {
        None
    }

    fn max_sequences(&self) -> Option<usize> {
        Some(self.slots())
    }

    fn max_step_adapters(&self) -> Option<usize> {
        Some(self.adapter_slots())
    }

    /// Also: a device's adapter slots have a fixed rank.
    fn check_adapter(&self, a: &retune_adapters::LoraAdapter) -> std::result::Result<(), String> {
        same_layers(&self.cfg, a)?;
        let rank = a
            .layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.rank)
            .max()
            .unwrap_or(0);
        if rank > self.max_rank() {
            return Err(format!(
                "adapter rank {rank} exceeds this device's max_rank {}",
                self.max_rank()
            ));
        }
        Ok(())
    }

    fn forward(&self, items: &mut [BatchItem<'_, Cache>]) -> Result<Vec<Vec<f32>>> {
        DeviceModel::forward(
            self,
            &mut view(items, |c| match c {
                Cache::Device(kv) => Some(kv),
                Cache::Host(_) => None,
            })?,
        )
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
                only: it.only,
                kv: pick(&mut *it.kv).ok_or_else(|| {
                    EngineError::InvalidRequest("cache from another backend".into())
                })?,
            })
        })
        .collect()
}
