//! Names of tenants, adapters and versions, and [`AdapterRef`]: one resolved
//! adapter version, built once per request and used by every later step (the
//! response header, the metrics, the loader) without parsing a string again.

use crate::error::NameError;
use std::fmt;

/// Tenant, adapter and version names: `[a-z0-9][a-z0-9._-]{0,63}`, no `..`.
pub fn check_name(what: &str, s: &str) -> Result<(), NameError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.contains("..")
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NameError(format!("invalid {what} `{s}`")))
    }
}

/// The store key of a version: `tenant/name/version`.
pub fn store_key(tenant: &str, name: &str, version: &str) -> String {
    format!("{tenant}/{name}/{version}")
}

/// How a request reached its adapter version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The adapter's `live` alias.
    Live,
    /// The canary share of traffic.
    Canary,
    /// `name@version` named the version.
    Pinned,
}

/// One adapter version of one tenant, resolved. The fields are checked names, so
/// the store key built from them cannot escape the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdapterRef {
    tenant: String,
    name: String,
    version: String,
    via: Via,
}

impl AdapterRef {
    /// A reference to `tenant/name@version`; every part must be a valid name.
    pub fn new(tenant: &str, name: &str, version: &str, via: Via) -> Result<Self, NameError> {
        check_name("tenant", tenant)?;
        check_name("adapter name", name)?;
        check_name("version", version)?;
        Ok(Self {
            tenant: tenant.into(),
            name: name.into(),
            version: version.into(),
            via,
        })
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn via(&self) -> Via {
        self.via
    }

    /// The key of the version's files in the store and of its loaded copy in the pool.
    pub fn key(&self) -> String {
        store_key(&self.tenant, &self.name, &self.version)
    }

    /// `name@version`, the model name a client can send to pin this version.
    pub fn model(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl fmt::Display for AdapterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.tenant, self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_refuses_names_that_could_escape_the_store() {
        for (t, n, v) in [
            ("acme", "tickets", "../../etc"),
            ("acme", "a/b", "v1"),
            ("", "tickets", "v1"),
            ("ACME", "tickets", "v1"),
            ("acme", "tickets", ".."),
        ] {
            assert!(
                AdapterRef::new(t, n, v, Via::Pinned).is_err(),
                "{t}/{n}/{v}"
            );
        }
        let r = AdapterRef::new("acme", "tickets", "0a1b", Via::Live).unwrap();
        assert_eq!(r.key(), "acme/tickets/0a1b");
        assert_eq!(r.model(), "tickets@0a1b");
        assert_eq!(r.to_string(), "acme/tickets@0a1b");
    }
}
