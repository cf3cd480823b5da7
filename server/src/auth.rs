//! API keys → tenants. Keys are configured as sha256 hashes and compared in
//! constant time.

use sha2::{Digest, Sha256};

pub struct Keys {
    /// (sha256 of key, tenant)
    tenants: Vec<([u8; 32], String)>,
    admin: Option<[u8; 32]>,
}

fn parse_hex(h: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    pub fn new(settings: &retune_config::Settings) -> Self {
        let tenants = settings
            .tenants
            .iter()
            .flat_map(|t| {
                t.key_sha256
                    .iter()
                    .filter_map(|k| parse_hex(k))
                    .map(move |h| (h, t.name.clone()))
            })
            .collect();
        Self {
            tenants,
            admin: settings
                .auth
                .admin_key_sha256
                .as_deref()
                .and_then(parse_hex),
        }
    }

    fn digest(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    /// The tenant of a bearer key; every configured key is compared.
    pub fn tenant(&self, key: &str) -> Option<&str> {
        let d = Self::digest(key);
        let mut found = None;
        for (h, t) in &self.tenants {
            if ct_eq(h, &d) {
                found = Some(t.as_str());
            }
        }
        found
    }

    pub fn is_admin(&self, key: &str) -> bool {
        self.admin
            .as_ref()
            .is_some_and(|a| ct_eq(a, &Self::digest(key)))
    }
}

/// sha256 hex of a key, for writing settings.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
