//! Reading settings: the TOML file, `RETUNE_<SECTION>__<KEY>` overrides, and
//! the checks every process runs once at startup.

use crate::*;
use std::path::Path;

impl Settings {
    /// Read `path` (TOML), apply `RETUNE_SECTION__KEY=value` overrides from `env`, validate.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.into(),
            source: e,
        })?;
        Self::from_toml(&text, env)
    }

    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("RETUNE_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let value = v
                .parse::<i64>()
                .map(toml::Value::Integer)
                .or_else(|_| v.parse::<bool>().map(toml::Value::Boolean))
                .unwrap_or(toml::Value::String(v));
            let table = doc
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Invalid {
                    field: section.clone(),
                    reason: "is not a section".into(),
                })?;
            table.insert(key, value);
        }
        let s: Settings = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.engine.max_batch == 0 || self.engine.max_queue == 0 {
            return bad("engine.max_batch/max_queue", "must be at least 1");
        }
        if self.engine.max_n == 0 {
            return bad("engine.max_n", "must be at least 1");
        }
        if self.engine.max_tokens_cap == 0 {
            return bad("engine.max_tokens_cap", "must be at least 1");
        }
        let e = &self.engine;
        let cuda_n = e
            .device
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if !(["cpu", "cuda", "candle-cpu"].contains(&e.device.as_str()) || cuda_n) {
            return bad("engine.device", "must be cpu, cuda, cuda:N or candle-cpu");
        }
        if !["bf16", "f16", "f32"].contains(&e.dtype.as_str()) {
            return bad("engine.dtype", "must be bf16, f16 or f32");
        }
        if !KERNEL_CHOICES.contains(&e.kernels.as_str()) {
            return bad(
                "engine.kernels",
                &format!(
                    "is `{}`: must be one of {}",
                    e.kernels,
                    KERNEL_CHOICES.join(", ")
                ),
            );
        }
        if e.kernels != "auto" && e.device != "cpu" {
            return bad(
                "engine.kernels",
                &format!(
                    "is `{}`: the CPU kernels run only with engine.device = \"cpu\" (it is `{}`)",
                    e.kernels, e.device
                ),
            );
        }
        if !["dense", "quantized"].contains(&e.weights.as_str()) {
            return bad("engine.weights", "must be dense or quantized");
        }
        if e.slot_context == 0 || e.device_adapter_slots == 0 || e.device_max_rank == 0 {
            return bad(
                "engine.slot_context/device_adapter_slots/device_max_rank",
                "must be at least 1",
            );
        }
        if e.prefix_cache_block == 0 || e.prefix_cache_block > 4096 {
            return bad("engine.prefix_cache_block", "must be in 1..=4096");
        }
        if !(1..=100).contains(&e.prefix_cache_tenant_percent) {
            return bad(
                "engine.prefix_cache_tenant_percent",
                &format!(
                    "is {}: must be in 1..=100 (a share of the prefix cache)",
                    e.prefix_cache_tenant_percent
                ),
            );
        }
        if e.prefix_cache_tokens > e.max_kv_tokens {
            return bad(
                "engine.prefix_cache_tokens",
                &format!(
                    "is {}: the prefix cache lives in the KV budget, engine.max_kv_tokens = {}",
                    e.prefix_cache_tokens, e.max_kv_tokens
                ),
            );
        }
        let a = &self.adapters;
        if !a.pinned.is_empty() && a.root.is_none() {
            return bad(
                "adapters.pinned",
                "pins adapters, but adapters.root is not set",
            );
        }
        for p in &a.pinned {
            let parts: Vec<&str> = p.split('/').collect();
            let name_ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && !s.contains("..")
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            };
            if parts.len() != 2 || !parts.iter().all(|s| name_ok(s)) {
                return bad(
                    "adapters.pinned",
                    &format!("`{p}` is not `tenant/name` (lowercase names)"),
                );
            }
        }
        if a.pinned.len() >= a.max_resident {
            return bad(
                "adapters.pinned",
                &format!(
                    "pins {} adapters: adapters.max_resident = {} leaves no room for the others",
                    a.pinned.len(),
                    a.max_resident
                ),
            );
        }
        if let Err((field, reason)) = self.trainer.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        for (field, url) in [
            ("datasets.url", &self.datasets.url),
            ("adapters.registry_url", &self.adapters.registry_url),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return bad(field, "must be a postgres:// or postgresql:// URL");
                }
                // its TLS options: a mode this client cannot honour, a CA file
                // that is missing or holds no certificate (in every build that
                // can connect: the SQL layer turns the feature on)
                #[cfg(feature = "postgres")]
                if let Err(e) = pg::pg_target(url) {
                    return bad(field, &e.0);
                }
            }
        }
        if let Some(url) = &self.adapters.store_url {
            let bucket = url
                .strip_prefix("s3://")
                .map(|r| r.split('/').next().unwrap_or(""));
            if bucket.is_none_or(str::is_empty) {
                return bad(
                    "adapters.store_url",
                    "must be s3://bucket or s3://bucket/prefix",
                );
            }
            if self.adapters.root.is_none() {
                return bad(
                    "adapters.store_url",
                    "needs adapters.root too (its store/ is the local cache)",
                );
            }
        }
        if let Some(e) = &self.adapters.store_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(
                    "adapters.store_endpoint",
                    "must be an http:// or https:// URL",
                );
            }
        }
        if self.adapters.registry_url.is_some() && self.adapters.root.is_none() {
            return bad(
                "adapters.registry_url",
                "needs adapters.root too (the version files live in its store/)",
            );
        }
        if self.datasets.capture_queue == 0 {
            return bad("datasets.capture_queue", "must be at least 1");
        }
        if self.server.max_body_bytes < 1024 {
            return bad("server.max_body_bytes", "must be at least 1024");
        }
        let hex64 = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
        if let Some(k) = &self.auth.admin_key_sha256 {
            if !hex64(k) {
                return bad("auth.admin_key_sha256", "must be a 64-character hex sha256");
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c))
            {
                return bad(
                    "tenants.name",
                    &format!("`{}` must be lowercase letters, digits, - or _", t.name),
                );
            }
            if !names.insert(&t.name) {
                return bad("tenants.name", &format!("`{}` appears twice", t.name));
            }
            if !["report", "rollback", "retrain"].contains(&t.on_tainted_live.as_str()) {
                return bad(
                    "tenants.on_tainted_live",
                    &format!("tenant `{}`: must be report, rollback or retrain", t.name),
                );
            }
            if !(0.0..=1.0).contains(&t.capture.sample_rate) {
                return bad(
                    "tenants.capture.sample_rate",
                    &format!("tenant `{}`: must be in [0, 1]", t.name),
                );
            }
            if t.key_sha256.is_empty() || !t.key_sha256.iter().all(|k| hex64(k)) {
                return bad(
                    "tenants.key_sha256",
                    &format!("tenant `{}` needs 64-character hex sha256 keys", t.name),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[model]\npath = \"m.gguf\"\n[[tenants]]\nname = \"acme\"\nkey_sha256 = [\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]\n";

    #[test]
    fn defaults_env_overrides_and_validation() {
        let s = Settings::from_toml(BASE, []).unwrap();
        assert_eq!(s.server.port, 8080);
        assert_eq!(s.model.id, "base");
        let s = Settings::from_toml(
            BASE,
            [
                ("RETUNE_SERVER__PORT".into(), "9000".into()),
                ("RETUNE_MODEL__ID".into(), "smol".into()),
            ],
        )
        .unwrap();
        assert_eq!((s.server.port, s.model.id.as_str()), (9000, "smol"));
        assert!(
            Settings::from_toml(BASE, [("RETUNE_ENGINE__MAX_BATCH".into(), "0".into())]).is_err()
        );
        assert!(Settings::from_toml("[model]\npath = 1", []).is_err());
        assert!(
            Settings::from_toml(&format!("{BASE}[server]\nbogus = 1\n"), []).is_err(),
            "unknown keys are errors"
        );
        let dup = format!(
            "{BASE}[[tenants]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\n",
            "b".repeat(64)
        );
        assert!(Settings::from_toml(&dup, []).is_err());
    }

    #[test]
    fn gate_metric_and_rollout_are_their_choices_and_anything_else_is_named() {
        let s = Settings::from_toml(BASE, []).unwrap();
        let d = &s.trainer.defaults.gate;
        assert_eq!(
            (d.metric, d.rollout),
            (GateMetric::Auto, RolloutMode::Canary)
        );
        let s = Settings::from_toml(
            &format!("{BASE}[trainer.defaults.gate]\nmetric = \"token_f1\"\nrollout = \"live\"\n"),
            [],
        )
        .unwrap();
        let d = &s.trainer.defaults.gate;
        assert_eq!(
            (d.metric, d.rollout),
            (GateMetric::TokenF1, RolloutMode::Live)
        );
        for bad in [
            "[trainer.defaults.gate]\nmetric = \"bleu\"\n",
            "[trainer.defaults.gate]\nrollout = \"shadow\"\n",
        ] {
            let err = Settings::from_toml(&format!("{BASE}{bad}"), [])
                .unwrap_err()
                .to_string();
            let word = if bad.contains("bleu") {
                "`bleu`"
            } else {
                "`shadow`"
            };
            assert!(err.contains(word) && err.contains("expected"), "{err}");
        }
    }

    #[test]
    fn engine_kernels_takes_the_kernel_choices_and_names_itself_otherwise() {
        assert_eq!(
            Settings::from_toml(BASE, []).unwrap().engine.kernels,
            "auto"
        );
        for c in KERNEL_CHOICES {
            let s = Settings::from_toml(BASE, [("RETUNE_ENGINE__KERNELS".into(), c.into())]);
            assert_eq!(s.unwrap().engine.kernels, c);
        }
        let err =
            Settings::from_toml(&format!("{BASE}[engine]\nkernels = \"amx\"\n"), []).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, reason }
                if field == "engine.kernels" && reason.contains("`amx`") && reason.contains("int8")),
            "{err}"
        );
        let err = Settings::from_toml(
            &format!("{BASE}[engine]\nkernels = \"int8\"\ndevice = \"cuda\"\n"),
            [],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, reason }
                if field == "engine.kernels" && reason.contains("engine.device")),
            "{err}"
        );
    }

    #[test]
    fn a_datasets_url_chooses_postgresql_and_anything_else_is_refused() {
        let s = Settings::from_toml(BASE, []).unwrap();
        assert_eq!(s.datasets.url, None);
        let env = |v: &str| [("RETUNE_DATASETS__URL".to_string(), v.to_string())];
        let s = Settings::from_toml(BASE, env("postgres://u:p@db:5432/retune")).unwrap();
        assert_eq!(
            s.datasets.location(&s.adapters).as_deref(),
            Some("postgres://u:p@db:5432/retune")
        );
        let err = Settings::from_toml(BASE, env("mysql://db/retune")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, .. } if field == "datasets.url"),
            "{err}"
        );
    }

    #[test]
    fn a_registry_url_chooses_postgresql_and_anything_else_is_refused() {
        let env = |url: Option<&str>| {
            let mut e = vec![("RETUNE_ADAPTERS__ROOT".to_string(), "/data".to_string())];
            if let Some(u) = url {
                e.push(("RETUNE_ADAPTERS__REGISTRY_URL".to_string(), u.to_string()));
            }
            e
        };
        let root = PathBuf::from("/data");
        let s = Settings::from_toml(BASE, env(None)).unwrap();
        assert_eq!(s.adapters.registry_location(&root), "/data/registry.db");
        let s = Settings::from_toml(BASE, env(Some("postgresql://u:p@db/retune"))).unwrap();
        assert_eq!(
            s.adapters.registry_location(&root),
            "postgresql://u:p@db/retune"
        );
        let mut cases = vec![
            ("sqlite:///x.db", env(Some("sqlite:///x.db"))),
            // no root: the version files would have nowhere to live
            (
                "postgres://db/r",
                vec![(
                    "RETUNE_ADAPTERS__REGISTRY_URL".to_string(),
                    "postgres://db/r".to_string(),
                )],
            ),
        ];
        // TLS options this client cannot honour (checked where it can connect)
        #[cfg(feature = "postgres")]
        cases.extend([
            ("sslmode=allow", env(Some("postgres://db/r?sslmode=allow"))),
            (
                "a missing CA file",
                env(Some(
                    "postgres://db/r?sslmode=require&sslrootcert=/nonexistent.pem",
                )),
            ),
        ]);
        for (url, env) in cases {
            let err = Settings::from_toml(BASE, env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field, .. } if field == "adapters.registry_url"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn declared_label_sets_are_refused_naming_the_key_unless_sound() {
        let with = |labels: &str| {
            Settings::from_toml(
                &format!("{BASE}[[trainer.adapters]]\ntenant = \"acme\"\nname = \"t\"\n[trainer.adapters.data]\nlabels = {labels}\n"),
                [],
            )
        };
        assert!(with(r#"["a", "b"]"#).is_ok());
        for (labels, why) in [
            ("[]", "at least 2 labels"),
            (r#"["a"]"#, "at least 2 labels"),
            (r#"["a", " "]"#, "label 1 is empty"),
            (r#"["a", "b", "a"]"#, "`a` is declared twice"),
        ] {
            let err = with(labels).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field, reason } if field == "trainer.adapters[0].data.labels" && reason.contains(why)),
                "{labels}: {err}"
            );
        }
        // labels that are not strings: the parser names the key
        let err = with("[1, 2]").unwrap_err().to_string();
        assert!(err.contains("labels"), "{err}");
    }

    #[test]
    fn a_classifier_objective_needs_declared_labels() {
        let task = |extra: &str| {
            Settings::from_toml(
                &format!("{BASE}[[trainer.adapters]]\ntenant = \"acme\"\nname = \"t\"\n{extra}"),
                [],
            )
        };
        let s = task("").unwrap();
        assert_eq!(
            s.trainer.adapters[0]
                .resolve(&s.trainer.defaults)
                .train
                .objective,
            Objective::Auto
        );
        assert!(task("[trainer.adapters.train]\nobjective = \"generate\"\n").is_ok());
        assert!(task(
            "[trainer.adapters.data]\nlabels = [\"a\", \"b\"]\n[trainer.adapters.train]\nobjective = \"classify\"\n"
        )
        .is_ok());
        let err = task("[trainer.adapters.train]\nobjective = \"classify\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, reason } if field == "trainer.adapters[0].train.objective" && reason.contains("data.labels")),
            "{err}"
        );
        let err = task("[trainer.adapters.train]\nobjective = \"guess\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("objective") || err.contains("guess"), "{err}");
        // LoRA+'s ratio: above 0 and finite, 1 (plain LoRA) by default
        let s = task("[trainer.adapters.train]\nlora_plus_ratio = 8.0\n").unwrap();
        assert_eq!(
            s.trainer.adapters[0]
                .resolve(&s.trainer.defaults)
                .train
                .lora_plus_ratio,
            8.0
        );
        assert_eq!(s.trainer.defaults.train.lora_plus_ratio, 1.0);
        for bad in ["0.0", "-2.0", "nan"] {
            let err = task(&format!(
                "[trainer.adapters.train]\nlora_plus_ratio = {bad}\n"
            ))
            .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field, .. } if field.ends_with("train.lora_plus_ratio")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn prefix_cache_settings_that_cannot_fit_are_refused_naming_the_key() {
        let s = Settings::from_toml(BASE, []).unwrap();
        assert_eq!(s.engine.prefix_cache_tokens, 16_384);
        assert!(!s.tenants[0].public_prefixes);
        for (key, value, field) in [
            (
                "RETUNE_ENGINE__PREFIX_CACHE_TENANT_PERCENT",
                "150",
                "engine.prefix_cache_tenant_percent",
            ),
            (
                "RETUNE_ENGINE__PREFIX_CACHE_TENANT_PERCENT",
                "0",
                "engine.prefix_cache_tenant_percent",
            ),
            (
                "RETUNE_ENGINE__PREFIX_CACHE_TOKENS",
                "100000",
                "engine.prefix_cache_tokens",
            ),
            (
                "RETUNE_ENGINE__PREFIX_CACHE_BLOCK",
                "0",
                "engine.prefix_cache_block",
            ),
        ] {
            let err = Settings::from_toml(BASE, [(key.into(), value.into())]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if f == field),
                "{key}={value}: {err}"
            );
        }
        for (toml, why) in [
            ("[adapters]\npinned = [\"acme/tickets\"]\n", "no root"),
            (
                "[adapters]\nroot = \"/srv\"\npinned = [\"acme\"]\n",
                "not tenant/name",
            ),
            (
                "[adapters]\nroot = \"/srv\"\npinned = [\"Acme/x\"]\n",
                "uppercase",
            ),
            (
                "[adapters]\nroot = \"/srv\"\nmax_resident = 1\npinned = [\"a/x\", \"a/y\"]\n",
                "beyond max_resident",
            ),
        ] {
            let err = Settings::from_toml(&format!("{BASE}\n{toml}"), []).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if f == "adapters.pinned"),
                "{why}: {err}"
            );
        }
        let ok = Settings::from_toml(
            &format!("{BASE}\n[adapters]\nroot = \"/srv\"\npinned = [\"acme/tickets\"]\n"),
            [],
        )
        .unwrap();
        assert_eq!(ok.adapters.pinned, vec!["acme/tickets".to_string()]);
        let off = Settings::from_toml(
            BASE,
            [("RETUNE_ENGINE__PREFIX_CACHE_TOKENS".into(), "0".into())],
        );
        assert_eq!(off.unwrap().engine.prefix_cache_tokens, 0);
    }
}
