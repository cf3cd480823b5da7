use super::{Compute, DeviceModel};
use crate::error::{EngineError, Result};
use crate::model::Model;
use candle_core::{DType, Device};

/// How projection weights are held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// Dense matrices in the model dtype (GGUF quants dequantized at load).
    Dense,
    /// GGUF Q4_0/Q4_1/Q8_0 (and other ggml quants) as candle `QMatMul`s; other
    /// weights dense.
    Quantized,
}

#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Weight / projection dtype (F32, F16 or BF16).
    pub dtype: DType,
    pub weights: WeightMode,
    /// Concurrent sequences (KV slots); the scheduler's `max_batch` must not exceed it.
    pub slots: usize,
    /// Positions per KV slot (capped at the model's context).
    pub slot_context: usize,
    /// Adapters resident on the device at once.
    pub adapter_slots: usize,
    /// Largest LoRA rank the device slabs hold.
    pub max_rank: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            weights: WeightMode::Dense,
            slots: 64,
            slot_context: 4096,
            adapter_slots: 128,
            max_rank: 16,
        }
    }
}

/// Parse a device name: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let bad =
        || EngineError::InvalidRequest(format!("unknown device `{name}` (cpu, cuda, cuda:N)"));
    let n = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => {
            let n = name.strip_prefix("cuda:").ok_or_else(bad)?;
            n.parse().map_err(|_| bad())?
        }
    };
    Device::new_cuda(n).map_err(|e| match e {
        candle_core::Error::NotCompiledWithCudaSupport => EngineError::InvalidRequest(format!(
            "device `{name}`: this binary was built without CUDA (build with `--features cuda`)"
        )),
        e => EngineError::InvalidRequest(format!("device `{name}`: {e}")),
    })
}

/// Parse a dtype name: `f32`, `f16`, `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(EngineError::InvalidRequest(format!(
            "unknown dtype `{name}` (f32, f16, bf16)"
        ))),
    }
}

/// Tensor-backend options from the engine settings.
pub fn options_from_settings(e: &retune_config::EngineSettings) -> Result<DeviceOptions> {
    Ok(DeviceOptions {
        dtype: parse_dtype(&e.dtype)?,
        weights: match e.weights.as_str() {
            "dense" => WeightMode::Dense,
            "quantized" => WeightMode::Quantized,
            w => {
                return Err(EngineError::InvalidRequest(format!(
                    "unknown weights mode `{w}` (dense, quantized)"
                )))
            }
        },
        slots: e.max_batch,
        slot_context: e.slot_context,
        adapter_slots: e.device_adapter_slots,
        max_rank: e.device_max_rank,
    })
}

/// The backend a device setting names: `cpu` = the native CPU engine; `candle-cpu`
/// = the tensor backend on candle's CPU device; `cuda` / `cuda:N` = the tensor
/// backend on that GPU (a clear error when the build has no CUDA or no GPU is found).
pub fn build_backend(model: Model, device: &str, opts: &DeviceOptions) -> Result<Box<dyn Compute>> {
    match device {
        "cpu" => Ok(model.into()),
        name => Ok(build_device(model, name, opts)?.into()),
    }
}

/// The tensor backend on the device a setting names (`candle-cpu`, `cuda`,
/// `cuda:N`); `cpu` (the native engine) is not one.
pub fn build_device(model: Model, device: &str, opts: &DeviceOptions) -> Result<DeviceModel> {
    match device {
        "cpu" => Err(EngineError::InvalidRequest(
            "`cpu` is the native engine, not a tensor-backend device (candle-cpu, cuda, cuda:N)"
                .into(),
        )),
        "candle-cpu" => DeviceModel::from_model(model, &Device::Cpu, opts),
        name => DeviceModel::from_model(model, &parse_device(name)?, opts),
    }
}
