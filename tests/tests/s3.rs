//! The S3-compatible version store against a real server (s3s-fs): versions
//! round-trip through the bucket, each replica verifies what it downloads, a
//! tampered object is refused and counted and never served, and an unreachable
//! bucket fails only cold adapters (as Unavailable) while resident ones serve.

use retune_adapters::*;
use retune_engine::tiny::{self, TinySpec};
use retune_registry::*;
use retune_testkit::s3::S3Test;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-s3t-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base() -> ServedBase {
    let s = TinySpec::default();
    let hd = s.hidden / s.n_head;
    let (h, q, kv, f) = (s.hidden, s.n_head * hd, s.n_kv_head * hd, s.ffn);
    ServedBase {
        shapes: BaseShapes {
            n_layers: s.n_layer,
            dims: [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)],
        },
        fingerprint: "tiny-llama-test".into(),
    }
}

/// A replica: the shared registry file, the shared bucket, its own cache.
fn replica(dir: &Path, s3: &S3Test, name: &str) -> Arc<Registry> {
    let store = open_store(&dir.join(name), Some(&s3.url), Some(&s3.endpoint)).unwrap();
    Arc::new(Registry::open(&dir.join("registry.db"), store, 64 << 20).unwrap())
}

fn register(reg: &Registry, dir: &Path, seed: u64) -> String {
    let up = dir.join(format!("upload-{seed}"));
    tiny::write_adapter(&up, &TinySpec::default(), 4, &[0, 2], seed, 8.0, 0.05).unwrap();
    reg.register(
        NewVersion {
            tenant: "acme",
            name: "tickets",
            dir: &up,
            source: "upload",
            parent: None,
            metadata: serde_json::json!({}),
            claimed_base: None,
            actor: "t",
        },
        &base(),
    )
    .unwrap()
    .id
}

fn pinned(v: &str) -> AdapterRef {
    AdapterRef::new("acme", "tickets", v, Via::Pinned).unwrap()
}

/// `r` from `pool` once settled (10 s at most): the adapter or the error.
fn acquired(pool: &AdapterPool, r: &AdapterRef) -> Result<Arc<LoraAdapter>, Arc<AdapterError>> {
    let t = Instant::now();
    loop {
        match pool.acquire(r) {
            Acquire::Ready(a) => return Ok(a),
            Acquire::Failed(e) => return Err(e),
            Acquire::Pending => {
                assert!(t.elapsed() < Duration::from_secs(10), "{r} never settled");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[test]
fn versions_round_trip_through_the_bucket_verified_per_replica_and_a_tampered_object_is_refused() {
    let s3 = S3Test::new().unwrap();
    let dir = tmpdir("roundtrip");
    let a = replica(&dir, &s3, "cache-a");
    let v1 = register(&a, &dir, 1);
    let v2 = register(&a, &dir, 2);
    // written to the bucket under its content id
    let obj = s3.object_file(&format!(
        "versions/acme/tickets/{v1}/adapter_model.safetensors"
    ));
    let uploaded = std::fs::read(&obj).unwrap();
    assert_eq!(
        uploaded,
        std::fs::read(dir.join("upload-1/adapter_model.safetensors")).unwrap()
    );
    // another replica downloads, verifies and serves the same bytes
    let b = replica(&dir, &s3, "cache-b");
    let got = b.servable_dir(&pinned(&v1)).unwrap();
    assert!(got.starts_with(dir.join("cache-b").canonicalize().unwrap()));
    assert_eq!(
        std::fs::read(got.join("adapter_model.safetensors")).unwrap(),
        uploaded
    );
    let pool = AdapterPool::new(b.clone(), base().shapes, PoolConfig::default());
    acquired(&pool, &pinned(&v1)).unwrap();
    // tamper with v2 in the bucket (same size, one byte flipped)
    let obj2 = s3.object_file(&format!(
        "versions/acme/tickets/{v2}/adapter_model.safetensors"
    ));
    let mut bytes = std::fs::read(&obj2).unwrap();
    let k = bytes.len() - 3;
    bytes[k] ^= 0x55;
    std::fs::write(&obj2, &bytes).unwrap();
    let e = b.servable_dir(&pinned(&v2)).unwrap_err();
    assert!(
        matches!(&e, RegistryError::Invalid(m) if m.contains("content id")),
        "{e:?}"
    );
    assert_eq!(b.store_refused(), 1, "counted");
    assert!(
        !dir.join(format!("cache-b/acme/tickets/{v2}")).exists(),
        "a refused object never enters the cache"
    );
    // only its own requests fail
    let e = acquired(&pool, &pinned(&v2)).unwrap_err();
    assert!(e.to_string().contains("content id"), "{e}");
    acquired(&pool, &pinned(&v1)).unwrap();
    // the replica that wrote it kept its own verified copy
    assert!(a.servable_dir(&pinned(&v2)).is_ok());
    assert_eq!(a.store_refused(), 0);
}

#[test]
fn bucket_unreachable_resident_adapters_serve_cold_ones_are_unavailable_and_it_resumes() {
    let s3 = S3Test::new().unwrap();
    let dir = tmpdir("outage");
    let a = replica(&dir, &s3, "cache-a");
    let v1 = register(&a, &dir, 1);
    let v2 = register(&a, &dir, 2);
    let b = replica(&dir, &s3, "cache-b");
    let pool = AdapterPool::new(b.clone(), base().shapes, PoolConfig::default());
    let resident = acquired(&pool, &pinned(&v1)).unwrap();
    s3.stop();
    // resident: served from memory, again and again
    for _ in 0..10 {
        let again = acquired(&pool, &pinned(&v1)).unwrap();
        assert!(Arc::ptr_eq(&again, &resident));
    }
    // cold: fails as Unavailable (a 503 for its requests), within seconds
    let t = Instant::now();
    let e = acquired(&pool, &pinned(&v2)).unwrap_err();
    assert!(matches!(*e, AdapterError::Unavailable(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(b.store_refused(), 0, "unreachable is not tampered");
    // registering needs the bucket: refused as Unavailable, nothing half-written
    let up = dir.join("upload-3");
    tiny::write_adapter(&up, &TinySpec::default(), 4, &[0, 2], 3, 8.0, 0.05).unwrap();
    let e = a
        .register(
            NewVersion {
                tenant: "acme",
                name: "tickets",
                dir: &up,
                source: "upload",
                parent: None,
                metadata: serde_json::json!({}),
                claimed_base: None,
                actor: "t",
            },
            &base(),
        )
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unavailable(_)), "{e:?}");
    assert_eq!(a.versions("acme", "tickets").unwrap().len(), 2);
    // back: the cold version loads once its short backoff is over
    s3.start().unwrap();
    let t = Instant::now();
    loop {
        match acquired(&pool, &pinned(&v2)) {
            Ok(_) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "never resumed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
