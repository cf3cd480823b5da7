//! A PEFT adapter's `adapter_config.json`: what it targets, its rank and
//! scaling, per-module overrides, and the PEFT features retune refuses by name.

use crate::error::AdapterError;
use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Largest `lora_alpha` (and `alpha_pattern` value) accepted: finite but absurd
/// values (-1e38) served empty text.
pub const MAX_ALPHA: f32 = 1e5;

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f32,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f32>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Newer PEFT features that change what the weights mean; refused when set.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// PEFT config fields whose non-default values change the math; refused.
const REFUSED_WHEN_SET: [(&str, &str); 7] = [
    ("lora_bias", "a trained bias on lora_B"),
    ("target_parameters", "LoRA on raw parameters (MoE experts)"),
    ("trainable_token_indices", "trained embedding rows"),
    ("layer_replication", "replicated layers"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("use_qalora", "QA-LoRA pooling"),
    ("use_bdlora", "block-diagonal LoRA"),
];

impl AdapterConfig {
    pub fn validate(&self) -> Result<(), AdapterError> {
        let unsupported = |field: &str, reason: &str| {
            Err(AdapterError::Unsupported {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if let Some(p) = &self.peft_type {
            if p != "LORA" {
                return unsupported(
                    "peft_type",
                    &format!("`{p}`; only LORA adapters are served"),
                );
            }
        }
        if self.use_dora {
            return unsupported("use_dora", "DoRA adapters are not supported");
        }
        if self.fan_in_fan_out {
            return unsupported(
                "fan_in_fan_out",
                "only nn.Linear-layout weights are supported",
            );
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return unsupported("bias", "trained biases are not supported");
        }
        if let Some(m) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            // a classification adapter's head (PEFT SEQ_CLS: `score`) is the one
            // fully trained module served
            let head = self.task_type.as_deref() == Some("SEQ_CLS") && m == &["score"];
            if !head {
                return unsupported(
                    "modules_to_save",
                    "fully trained modules (embeddings, lm_head) are not supported; a SEQ_CLS adapter may save `score` only",
                );
            }
        }
        if self.task_type.as_deref() == Some("SEQ_CLS")
            && self.modules_to_save.as_ref().is_none_or(|m| m.is_empty())
        {
            return Err(AdapterError::Config {
                field: "modules_to_save".into(),
                reason: "a SEQ_CLS adapter must save its `score` head".into(),
            });
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("layers_to_transform", "not supported");
        }
        for (field, what) in REFUSED_WHEN_SET {
            let set = match self.other.get(field) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                    false
                }
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(serde_json::Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                return unsupported(field, &format!("{what} is not supported"));
            }
        }
        if self.r == 0 {
            return Err(AdapterError::Config {
                field: "r".into(),
                reason: "must be at least 1".into(),
            });
        }
        let list = match &self.target_modules {
            Some(TargetModules::List(l)) => l.len(),
            _ => 0,
        };
        if self.rank_pattern.len() + self.alpha_pattern.len() + list > MAX_PATTERNS {
            return Err(AdapterError::Config {
                field: "rank_pattern/alpha_pattern/target_modules".into(),
                reason: format!("more than {MAX_PATTERNS} patterns"),
            });
        }
        let too_long = |p: &str| p.len() > MAX_PATTERN_BYTES;
        let long = self
            .rank_pattern
            .keys()
            .chain(self.alpha_pattern.keys())
            .any(|p| too_long(p))
            || match &self.target_modules {
                Some(TargetModules::List(l)) => l.iter().any(|p| too_long(p)),
                Some(TargetModules::One(p)) => p.len() > 4 * MAX_PATTERN_BYTES,
                None => false,
            };
        if long {
            return Err(AdapterError::Config {
                field: "rank_pattern/alpha_pattern/target_modules".into(),
                reason: format!("a pattern longer than {MAX_PATTERN_BYTES} bytes"),
            });
        }
        let alphas = std::iter::once(&self.lora_alpha).chain(self.alpha_pattern.values());
        for a in alphas {
            if !a.is_finite() || a.abs() > MAX_ALPHA {
                return Err(AdapterError::Config {
                    field: "lora_alpha".into(),
                    reason: format!("{a}: must be finite and at most {MAX_ALPHA} in magnitude"),
                });
            }
        }
        Ok(())
    }

    /// PEFT's pattern rule: a key matches a module name ending in it as a dotted suffix.
    #[cfg(test)]
    pub(crate) fn pattern_value<T: Copy>(
        patterns: &BTreeMap<String, T>,
        name: &str,
    ) -> Result<Option<T>, AdapterError> {
        Ok(first_match(&compile_patterns(patterns)?, name))
    }

    pub(crate) fn targets(&self, target: Option<&Regex>, name: &str, module: &str) -> bool {
        match &self.target_modules {
            None => true,
            Some(TargetModules::One(s)) if s == "all-linear" => true,
            Some(TargetModules::One(_)) => target.is_some_and(|re| re.is_match(name)),
            Some(TargetModules::List(l)) => l
                .iter()
                .any(|t| t == module || name.ends_with(&format!(".{t}"))),
        }
    }

    /// `target_modules` as a regex (when it is one), compiled once per load.
    pub(crate) fn target_regex(&self) -> Result<Option<Regex>, AdapterError> {
        match &self.target_modules {
            Some(TargetModules::One(re)) if re != "all-linear" => {
                Ok(Some(build_regex(&format!("^(?:{re})$"), "target_modules")?))
            }
            _ => Ok(None),
        }
    }
}

/// Patterns a config may hold (rank_pattern + alpha_pattern + a target_modules
/// list) and their longest length: compiling 1,500 of them per module made one
/// load take 28 s for everyone behind it.
pub const MAX_PATTERNS: usize = 64;
pub const MAX_PATTERN_BYTES: usize = 256;

pub(crate) fn build_regex(src: &str, field: &str) -> Result<Regex, AdapterError> {
    regex::RegexBuilder::new(src)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| AdapterError::Config {
            field: field.into(),
            reason: e.to_string(),
        })
}

pub(crate) fn compile_patterns<T: Copy>(
    patterns: &BTreeMap<String, T>,
) -> Result<Vec<(Regex, T)>, AdapterError> {
    patterns
        .iter()
        .map(|(pat, v)| {
            Ok((
                build_regex(&format!(r"^(.*\.)?({pat})$"), "rank_pattern/alpha_pattern")?,
                *v,
            ))
        })
        .collect()
}

pub(crate) fn first_match<T: Copy>(compiled: &[(Regex, T)], name: &str) -> Option<T> {
    compiled
        .iter()
        .find(|(re, _)| re.is_match(name))
        .map(|(_, v)| *v)
}
