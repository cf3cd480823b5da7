//! A version's files and its content id (what the store keys it by and the
//! packed form is checked against).

use sha2::{Digest, Sha256};
use std::path::Path;

/// The files of one adapter version.
pub const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Content hash of a version: sha256 over each file's name, length and bytes.
pub fn content_id(files: &[(&str, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in files {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex_id(h)
}

/// [`content_id`] of files on disk, read in 1 MiB pieces.
pub fn content_id_of(files: &[(&str, &Path)]) -> std::io::Result<String> {
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (name, path) in files {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        let mut read = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            read += n as u64;
            h.update(&buf[..n]);
        }
        if read != len {
            return Err(std::io::Error::other(format!(
                "{name} changed while it was read"
            )));
        }
    }
    Ok(hex_id(h))
}

fn hex_id(h: Sha256) -> String {
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..32]
        .to_string()
}
