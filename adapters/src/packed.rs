//! The compute form of a stored version (`compute.bin` beside its PEFT files):
//! the weights as validated at register, laid out pair by pair in the narrowest
//! of f16/bf16/f32 that holds every value exactly, so a cold load is one mapped
//! read and a widening copy, not a parse, a conversion, a NaN scan and a
//! validation.
//!
//! It is a derived, local cache of content the registry already checked by its
//! content id (sha256 over the PEFT files), and it is trusted only as far as:
//! - it names the content id and the base shapes it was made for;
//! - a crc32 over the whole file matches (a torn or flipped file is refused);
//! - the PEFT files it was made from still have the size, modification time
//!   and inode it recorded (a stat, microseconds): a PEFT file changed behind
//!   the registry's back sends the load back to the full check by content id,
//!   which refuses it.
//!
//! Anything else (missing, damaged, another format version) makes the pool load
//! the PEFT files the slow way, check them against the content id, and write a
//! new compute form.

use crate::error::AdapterError;
use crate::peft::{AdapterConfig, BaseShapes, LoadLimits, LoraAdapter, LoraPair};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the compute form inside a version's directory.
pub const PACKED_FILE: &str = "compute.bin";
const MAGIC: &[u8; 8] = b"RTPACK01";
const ALIGN: usize = 64;

/// What the compute form remembers of a PEFT file it was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub name: String,
    pub len: u64,
    pub modified_ns: u128,
    pub inode: u64,
}

impl FileStamp {
    pub fn of(dir: &Path, name: &str) -> std::io::Result<Self> {
        let m = std::fs::metadata(dir.join(name))?;
        let modified_ns = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Self {
            name: name.to_string(),
            len: m.len(),
            modified_ns,
            inode,
        })
    }

    /// Stamps of the PEFT files in `dir`.
    pub fn all(dir: &Path) -> std::io::Result<Vec<Self>> {
        crate::files::FILES
            .iter()
            .map(|f| Self::of(dir, f))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Dtype {
    F16,
    Bf16,
    F32,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Pair {
    layer: usize,
    module: usize,
    rank: usize,
    /// f32 bits: the scale exactly as the PEFT loader computed it
    scale: u32,
    dtype: Dtype,
    /// byte offsets in the payload
    a: usize,
    b: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    content_id: String,
    n_layers: usize,
    dims: Vec<(usize, usize)>,
    /// `adapter_config.json` as stored
    config: String,
    files: Vec<FileStamp>,
    pairs: Vec<Pair>,
    payload: usize,
}

fn narrowest(v: &[f32]) -> Dtype {
    if v.iter()
        .all(|&x| half::f16::from_f32(x).to_f32().to_bits() == x.to_bits())
    {
        Dtype::F16
    } else if v
        .iter()
        .all(|&x| half::bf16::from_f32(x).to_f32().to_bits() == x.to_bits())
    {
        Dtype::Bf16
    } else {
        Dtype::F32
    }
}

fn put(out: &mut Vec<u8>, v: &[f32], dt: Dtype) -> usize {
    while out.len() % ALIGN != 0 {
        out.push(0);
    }
    let at = out.len();
    out.reserve(v.len() * dt.size());
    match dt {
        Dtype::F32 => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Dtype::F16 => v
            .iter()
            .for_each(|&x| out.extend(half::f16::from_f32(x).to_le_bytes())),
        Dtype::Bf16 => v
            .iter()
            .for_each(|&x| out.extend(half::bf16::from_f32(x).to_le_bytes())),
    }
    at
}

/// The compute form of `adapter` (loaded and validated from the PEFT files
/// whose content id is `content_id`, now stored with `files` stamps).
pub fn pack(
    adapter: &LoraAdapter,
    config_json: &str,
    content_id: &str,
    files: Vec<FileStamp>,
    base: &BaseShapes,
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(adapter.bytes / 2);
    let mut pairs = Vec::new();
    for (layer, modules) in adapter.layers.iter().enumerate() {
        for (module, p) in modules.iter().enumerate() {
            let Some(p) = p else { continue };
            let dtype = match (narrowest(&p.a), narrowest(&p.b)) {
                (a, b) if a == b => a,
                _ => Dtype::F32,
            };
            let a = put(&mut payload, &p.a, dtype);
            let b = put(&mut payload, &p.b, dtype);
            pairs.push(Pair {
                layer,
                module,
                rank: p.rank,
                scale: p.scale.to_bits(),
                dtype,
                a,
                b,
            });
        }
    }
    let header = Header {
        content_id: content_id.to_string(),
        n_layers: base.n_layers,
        dims: base.dims.to_vec(),
        config: config_json.to_string(),
        files,
        pairs,
        payload: payload.len(),
    };
    let json = serde_json::to_vec(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + json.len() + 2 * ALIGN);
    out.extend_from_slice(MAGIC);
    out.extend((json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    while out.len() % ALIGN != 0 {
        out.push(0);
    }
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend(crc.to_le_bytes());
    out
}

fn widen(bytes: &[u8], dt: Dtype, n: usize) -> Vec<f32> {
    let mut v = crate::peft::recycle::take(n);
    match dt {
        Dtype::F32 => v.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::F16 => v.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::Bf16 => v.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    v
}

/// Why a compute form was not used (the pool then loads the PEFT files).
#[derive(Debug, thiserror::Error)]
pub enum PackedError {
    #[error("no compute form")]
    Missing,
    #[error("the compute form is damaged: {0}")]
    Damaged(String),
    #[error("the compute form is stale: {0}")]
    Stale(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

/// Load the compute form at `path` of version `content_id`, whose PEFT files
/// are in `dir`. Every check is listed in the module's documentation.
pub fn unpack(
    path: &Path,
    dir: &Path,
    content_id: &str,
    base: &BaseShapes,
    limits: &LoadLimits,
) -> Result<LoraAdapter, PackedError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PackedError::Missing),
        Err(e) => {
            return Err(AdapterError::Io {
                path: path.to_path_buf(),
                source: e,
            }
            .into())
        }
    };
    let io = |e: std::io::Error| AdapterError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let len = file.metadata().map_err(io)?.len();
    // f32 weights take at most twice the PEFT file (f16) plus the header
    if len
        > limits
            .max_file_bytes
            .saturating_mul(2)
            .saturating_add(1 << 20)
    {
        return Err(PackedError::Damaged(format!("{len} bytes")));
    }
    // SAFETY: read only while this function runs; versions are immutable files
    // written by rename, never in place (a damaged one fails the crc below).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let bytes: &[u8] = &map;
    let damaged = |why: &str| PackedError::Damaged(why.to_string());
    if bytes.len() < MAGIC.len() + 8 || &bytes[..8] != MAGIC {
        return Err(damaged("not a compute form of this format version"));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != crc {
        return Err(damaged("checksum mismatch"));
    }
    let hlen = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
    let json = body
        .get(12..12 + hlen)
        .ok_or_else(|| damaged("header out of bounds"))?;
    let header: Header =
        serde_json::from_slice(json).map_err(|e| damaged(&format!("header: {e}")))?;
    let start = (12 + hlen).div_ceil(ALIGN) * ALIGN;
    let payload = body
        .get(start..)
        .filter(|p| p.len() == header.payload)
        .ok_or_else(|| damaged("payload length"))?;
    if header.content_id != content_id {
        return Err(PackedError::Stale(format!(
            "made for content id {}",
            header.content_id
        )));
    }
    if header.n_layers != base.n_layers || header.dims != base.dims.to_vec() {
        return Err(PackedError::Stale("made for other base shapes".into()));
    }
    let now = FileStamp::all(dir).map_err(io)?;
    if now != header.files {
        return Err(PackedError::Stale(
            "the PEFT files changed since it was made".into(),
        ));
    }
    let config: AdapterConfig =
        serde_json::from_str(&header.config).map_err(|e| damaged(&format!("config: {e}")))?;
    if config.task_type.as_deref() == Some("SEQ_CLS") {
        // written before classifiers were kept out of it (it lacks the head)
        return Err(PackedError::Missing);
    }
    let mut layers: Vec<[Option<LoraPair>; 7]> =
        (0..base.n_layers).map(|_| Default::default()).collect();
    let mut total = 0;
    for p in &header.pairs {
        if p.layer >= base.n_layers || p.module >= 7 {
            return Err(damaged("pair out of range"));
        }
        if p.rank == 0 || p.rank > limits.max_rank {
            return Err(AdapterError::RankTooLarge {
                module: format!("layer {} module {}", p.layer, p.module),
                rank: p.rank,
                max: limits.max_rank,
            }
            .into());
        }
        let (out, inp) = base.dims[p.module];
        let (na, nb) = (p.rank * inp, out * p.rank);
        let slice = |at: usize, n: usize| {
            payload
                .get(at..at + n * p.dtype.size())
                .ok_or_else(|| damaged("tensor out of bounds"))
        };
        let a = widen(slice(p.a, na)?, p.dtype, na);
        let b = widen(slice(p.b, nb)?, p.dtype, nb);
        let slot = &mut layers[p.layer][p.module];
        if slot.is_some() {
            return Err(damaged("a pair twice"));
        }
        total += (a.len() + b.len()) * 4;
        *slot = Some(LoraPair {
            rank: p.rank,
            scale: f32::from_bits(p.scale),
            a,
            b,
        });
    }
    Ok(LoraAdapter::new(layers, total, config).with_content_id(content_id))
}

/// Whether `adapter` has a compute form: a classifier (its head and prior)
/// loads from its files each time, as the compute form holds LoRA pairs only.
pub fn packable(adapter: &LoraAdapter) -> bool {
    adapter.head.is_none()
}

/// Where a version's compute form lies, given its directory.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(PACKED_FILE)
}

/// Load version `content_id` from its PEFT files in `dir` after checking them
/// against the content id (sha256); a panic while loading (a hostile file
/// meeting a bug) fails this load only.
pub fn load_verified(
    dir: &Path,
    content_id: &str,
    base: &BaseShapes,
    limits: &LoadLimits,
) -> Result<LoraAdapter, AdapterError> {
    let mut files = Vec::new();
    for f in crate::files::FILES {
        let p = dir.join(f);
        let bytes = std::fs::read(&p).map_err(|e| AdapterError::Io {
            path: p.clone(),
            source: e,
        })?;
        files.push((f, bytes));
    }
    let id = crate::files::content_id(&files);
    if id != content_id {
        return Err(AdapterError::Config {
            field: "adapter".into(),
            reason: format!(
                "stored files of version {content_id} do not match its content id (found {id}): the store is corrupt"
            ),
        });
    }
    Ok(load_guarded(dir, base, limits)?.with_content_id(content_id))
}

/// [`crate::peft::load_peft`], with a panic (a hostile file meeting a bug)
/// failing this load only.
pub fn load_guarded(
    dir: &Path,
    base: &BaseShapes,
    limits: &LoadLimits,
) -> Result<LoraAdapter, AdapterError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::peft::load_peft(dir, base, limits)
    }))
    .unwrap_or_else(|_| {
        Err(AdapterError::Config {
            field: "adapter".into(),
            reason: "loading panicked (a bug met by this file)".into(),
        })
    })
}

/// The compute form of `adapter`, loaded from the checked PEFT files in `dir`.
pub fn pack_dir(
    adapter: &LoraAdapter,
    dir: &Path,
    content_id: &str,
    base: &BaseShapes,
) -> std::io::Result<Vec<u8>> {
    let config = std::fs::read_to_string(dir.join("adapter_config.json"))?;
    let files = FileStamp::all(dir)?;
    Ok(pack(adapter, &config, content_id, files, base))
}
