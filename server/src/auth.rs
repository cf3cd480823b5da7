//! API keys → tenants. Keys are configured as sha256 hashes and compared in
//! constant time.

use sha2::{Digest, Sha256};

pub struct Keys {
    /// (sha256 of key, tenant)
    tenants: Vec<([u8; 32], String)>,
    /// (sha256 of key, who)
    admins: Vec<([u8; 32], Admin)>,
    metrics: Option<[u8; 32]>,
}

/// Who an admin key is: its name (the journal's actor) and the tenants it manages.
#[derive(Clone, Debug, PartialEq)]
pub struct Admin {
    pub name: String,
    /// `None`: every tenant (the operator key).
    pub tenants: Option<Vec<String>>,
}

impl Admin {
    pub fn may(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tenant))
    }

    pub fn is_operator(&self) -> bool {
        self.tenants.is_none()
    }
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
        let a = &settings.auth;
        let mut admins: Vec<([u8; 32], Admin)> = a
            .admin_key_sha256
            .as_deref()
            .and_then(parse_hex)
            .map(|h| {
                (
                    h,
                    Admin {
                        name: "admin".into(),
                        tenants: None,
                    },
                )
            })
            .into_iter()
            .collect();
        for k in &a.admins {
            if let Some(h) = parse_hex(&k.key_sha256) {
                admins.push((
                    h,
                    Admin {
                        name: k.name.clone(),
                        tenants: Some(k.tenants.clone()),
                    },
                ));
            }
        }
        Self {
            tenants,
            admins,
            metrics: a.metrics_key_sha256.as_deref().and_then(parse_hex),
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

    /// The admin a bearer key is; every configured key is compared.
    pub fn admin(&self, key: &str) -> Option<&Admin> {
        let d = Self::digest(key);
        let mut found = None;
        for (h, a) in &self.admins {
            if ct_eq(h, &d) {
                found = Some(a);
            }
        }
        found
    }

    /// May this key read `/metrics` (the metrics key, or the operator's key)?
    pub fn may_scrape(&self, key: &str) -> bool {
        let d = Self::digest(key);
        let metrics = self.metrics.as_ref().is_some_and(|m| ct_eq(m, &d));
        metrics || self.admin(key).is_some_and(Admin::is_operator)
    }
}

/// sha256 hex of a key, for writing settings.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
