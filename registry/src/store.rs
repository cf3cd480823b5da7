//! Version files: immutable directories under the adapter root, written to a
//! temporary place, fsynced, then renamed into place. Behind [`BlobStore`] so a
//! multi-replica deployment can put them in object storage later.

use crate::error::RegistryError;
use retune_adapters::check_name;
pub use retune_adapters::files::{content_id, content_id_of, FILES};
use std::path::{Path, PathBuf};

pub trait BlobStore: Send + Sync {
    /// Store `files` (name, the file to copy) as version `key` (`tenant/name/id`);
    /// idempotent. Files are streamed, never read whole into memory.
    fn put(&self, key: &str, files: &[(&str, &Path)]) -> Result<(), RegistryError>;
    /// A local directory holding the version's files (for the loader).
    fn local_dir(&self, key: &str) -> Result<PathBuf, RegistryError>;
    fn delete(&self, key: &str) -> Result<(), RegistryError>;
    /// Store a file derived from version `key`'s content (its compute form) in
    /// its local directory, atomically (written aside, then renamed).
    fn put_derived(&self, key: &str, name: &str, bytes: &[u8]) -> Result<(), RegistryError>;
    /// Stored objects refused because they did not match their content id
    /// (a shared store that someone else can write to).
    fn refused(&self) -> u64 {
        0
    }
}

pub struct LocalStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RegistryError + '_ {
    move |e| RegistryError::Io(format!("{}: {e}", path.display()))
}

impl LocalStore {
    pub fn new(root: &Path) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(root.join(".tmp")).map_err(io(root))?;
        let root = root.canonicalize().map_err(io(root))?;
        // leftovers of writers that crashed mid-write (never referenced by the registry)
        let stale = std::time::Duration::from_secs(600);
        if let Ok(entries) = std::fs::read_dir(root.join(".tmp")) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a > stale);
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Self { root })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, RegistryError> {
        let parts: Vec<&str> = key.split('/').collect();
        if parts.len() != 3 {
            return Err(RegistryError::Forbidden(format!("bad version key `{key}`")));
        }
        for p in &parts {
            check_name("path component", p)?;
        }
        Ok(self.root.join(parts[0]).join(parts[1]).join(parts[2]))
    }

    fn fsync_dir(p: &Path) -> Result<(), RegistryError> {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(io(p))
    }
}

impl BlobStore for LocalStore {
    fn put(&self, key: &str, files: &[(&str, &Path)]) -> Result<(), RegistryError> {
        let dest = self.path_of(key)?;
        if dest.exists() {
            return Ok(()); // same key = same content
        }
        // one temporary directory per writer: concurrent uploads of the same
        // content never share (or delete) each other's files
        let tmp = self.root.join(".tmp").join(format!(
            "{}-{:016x}-{}",
            std::process::id(),
            rand::random::<u64>(),
            key.replace('/', "_")
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        for (name, from) in files {
            let p = tmp.join(name);
            let copied = std::fs::copy(from, &p)
                .and_then(|_| std::fs::File::open(&p))
                .and_then(|f| f.sync_all());
            if let Err(e) = copied {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(RegistryError::Io(format!("storing {name}: {e}")));
            }
        }
        Self::fsync_dir(&tmp)?;
        let parent = dest
            .parent()
            .ok_or_else(|| RegistryError::Forbidden(key.into()))?;
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {}
            Err(_) if dest.exists() => {
                let _ = std::fs::remove_dir_all(&tmp); // a concurrent writer stored the same content
            }
            Err(e) => return Err(io(&dest)(e)),
        }
        Self::fsync_dir(parent)
    }

    fn local_dir(&self, key: &str) -> Result<PathBuf, RegistryError> {
        let p = self.path_of(key)?;
        let real = p
            .canonicalize()
            .map_err(|_| RegistryError::NotFound(format!("files of version {key}")))?;
        if !real.starts_with(&self.root) {
            return Err(RegistryError::Forbidden(format!(
                "version {key} resolves outside the adapter root"
            )));
        }
        for f in FILES {
            let meta = std::fs::symlink_metadata(real.join(f))
                .map_err(|_| RegistryError::NotFound(format!("{key}/{f}")))?;
            if !meta.file_type().is_file() {
                return Err(RegistryError::Forbidden(format!(
                    "{key}/{f} is not a regular file"
                )));
            }
        }
        Ok(real)
    }

    fn put_derived(&self, key: &str, name: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        check_name("derived file", name)?;
        if FILES.contains(&name) {
            return Err(RegistryError::Forbidden(format!(
                "{name} is a version file, not a derived one"
            )));
        }
        let dir = self.local_dir(key)?;
        let tmp = self.root.join(".tmp").join(format!(
            "{}-{:016x}-{name}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::File::open(&tmp))
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, dir.join(name)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(RegistryError::Io(format!("storing {key}/{name}: {e}")));
        }
        Self::fsync_dir(&dir)
    }

    fn delete(&self, key: &str) -> Result<(), RegistryError> {
        let p = self.path_of(key)?;
        match std::fs::remove_dir_all(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_of_the_same_content_all_succeed_and_leave_it_whole() {
        let root = std::env::temp_dir().join(format!("retune-store-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = std::sync::Arc::new(LocalStore::new(&root).unwrap());
        let src = root.with_extension("src");
        std::fs::create_dir_all(&src).unwrap();
        let weights = vec![7u8; 1 << 20];
        std::fs::write(src.join("c"), b"{}").unwrap();
        std::fs::write(src.join("w"), &weights).unwrap();
        let (c, w) = (src.join("c"), src.join("w"));
        let files: Vec<(&str, &Path)> = vec![
            ("adapter_config.json", &c),
            ("adapter_model.safetensors", &w),
        ];
        let key = "acme/tickets/0123456789abcdef0123456789abcdef";
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|_| s.spawn(|| store.put(key, &files)))
                .collect();
            for h in hs {
                h.join().unwrap().unwrap();
            }
        });
        let dir = store.local_dir(key).unwrap();
        assert_eq!(
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
            weights
        );
        assert_eq!(
            content_id_of(&files).unwrap(),
            content_id(&[
                ("adapter_config.json", b"{}".to_vec()),
                ("adapter_model.safetensors", weights.clone())
            ]),
            "hashing from disk and from memory agree"
        );
        assert_eq!(
            std::fs::read_dir(root.join(".tmp")).unwrap().count(),
            0,
            "no temporary files left"
        );
    }
}
