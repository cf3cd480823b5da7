//! Structured output: constrained decoding with `llguidance` (the grammar engine
//! llama.cpp, vLLM and mistral.rs use). A request's [`Constraint`] compiles, when
//! it is validated, into a [`Guide`]: per sequence, the set of tokens the grammar
//! allows next. The scheduler computes those masks beside the forward pass (see
//! `Worker::step`), so a constrained row does not stall the batch.

use crate::error::{EngineError, Result};
use crate::tokenizer::Tok;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What the output must be.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under this JSON Schema (`json_schema`, `strict`).
    JsonSchema { schema: Value },
    /// Exactly one of these strings (vLLM's `guided_choice`).
    Choice { choices: Vec<String> },
    /// A match of this regular expression (vLLM's `guided_regex`).
    Regex { pattern: String },
}

/// Choices a [`Constraint::Choice`] may list, and their longest length in bytes.
pub const MAX_CHOICES: usize = 1024;
pub const MAX_CHOICE_BYTES: usize = 1024;
/// Longest schema or pattern text, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// JSON is written with single spaces after `:` and `,` and no other
/// whitespace: free whitespace lets a sampled model pad forever.
fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// Any JSON object, written as [`json_options`] writes JSON, with numbers of
/// at most 16 digits before and after the point (beyond what an IEEE double
/// holds, RFC 8259's interoperable range): a digit run cannot eat the budget.
const JSON_OBJECT: &str = r#"
start: object
object: "{" (pair (", " pair)*)? "}"
pair: STRING ": " value
value: object | array | STRING | NUMBER | "true" | "false" | "null"
array: "[" (value (", " value)*)? "]"
STRING: /"(\\(["\\\/bfnrt]|u[a-fA-F0-9]{4})|[^"\\\x00-\x1F\x7F])*"/
NUMBER: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,3})?/
"#;

impl Constraint {
    fn what(&self) -> &'static str {
        match self {
            Self::JsonObject | Self::JsonSchema { .. } => "schema",
            Self::Choice { .. } => "choice list",
            Self::Regex { .. } => "pattern",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        Ok(match self {
            Self::JsonObject => TopLevelGrammar::from_lark(JSON_OBJECT.into()),
            Self::JsonSchema { schema } => {
                let Some(obj) = schema.as_object() else {
                    if schema.is_boolean() {
                        return bad("a boolean schema is not supported; give an object".into());
                    }
                    return bad("the schema must be a JSON object".into());
                };
                if serde_json::to_string(schema).map_or(0, |t| t.len()) > MAX_GRAMMAR_BYTES {
                    return bad(format!("the schema is over {MAX_GRAMMAR_BYTES} bytes"));
                }
                let mut s = Value::Object(obj.clone());
                s["x-guidance"] = json_options();
                TopLevelGrammar::from_json_schema(s)
            }
            Self::Choice { choices } => {
                if choices.is_empty() || choices.len() > MAX_CHOICES {
                    return bad(format!("give 1 to {MAX_CHOICES} choices"));
                }
                if choices
                    .iter()
                    .any(|c| c.is_empty() || c.len() > MAX_CHOICE_BYTES)
                {
                    return bad(format!("each choice must be 1 to {MAX_CHOICE_BYTES} bytes"));
                }
                let alts: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alts.join("|")))
            }
            Self::Regex { pattern } => {
                if pattern.is_empty() || pattern.len() > MAX_GRAMMAR_BYTES {
                    return bad(format!(
                        "the pattern must be 1 to {MAX_GRAMMAR_BYTES} bytes"
                    ));
                }
                TopLevelGrammar::from_regex(pattern)
            }
        })
    }
}

/// The tokenizer as the grammar engine sees it: a trie of every id's bytes.
struct Env {
    trie: TokTrie,
    tok: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tok
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Compiles constraints for one vocabulary (built once per tokenizer).
pub struct Grammars {
    factory: ParserFactory,
    env: TokEnv,
    closing: Arc<Closing>,
}

/// Tokens that bring JSON to its end, for the wrap-up near the token budget
/// (see [`Guide::wrap_up`]).
struct Closing {
    /// `"` then only `}` and `]`: end the open string (and brackets).
    string_closers: SimpleVob,
    /// Only `}` and `]`: end objects and arrays.
    closers: SimpleVob,
    /// Only `0`: the shortest value.
    zero: SimpleVob,
    /// Only `"`, `:` and spaces: an empty string, a key's colon.
    fillers: SimpleVob,
}

impl Closing {
    fn new(trie: &TokTrie) -> Self {
        let n = trie.vocab_size();
        let class = |first: Option<u8>, rest: &[u8]| {
            let mut v = SimpleVob::alloc(n);
            for id in 0..n as u32 {
                let b = trie.token(id);
                let tail = match (first, b.split_first()) {
                    (_, None) => continue,
                    (Some(f), Some((&c, tail))) if c == f => tail,
                    (Some(_), Some(_)) => continue,
                    (None, Some(_)) => b,
                };
                if tail.iter().all(|c| rest.contains(c)) {
                    v.allow_token(id);
                }
            }
            v
        };
        Self {
            string_closers: class(Some(b'"'), b"}]"),
            closers: class(None, b"}]"),
            zero: class(None, b"0"),
            fillers: class(None, b"\": "),
        }
    }
}

/// Where JSON output stands: open brackets and whether a string is open.
#[derive(Clone, Copy, Debug, Default)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escape: bool,
}

impl JsonScan {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match (self.escape, b) {
                    (true, _) => self.escape = false,
                    (false, b'\\') => self.escape = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// Tokens the shortest ending needs, with room to spare: a bracket each,
    /// the string's quote, a key's colon and a value, an escape's end.
    fn budget_to_close(self) -> usize {
        self.depth + self.in_string as usize + 8
    }
}

impl Grammars {
    pub(crate) fn new(tok: &Tok) -> std::result::Result<Self, String> {
        let pieces = tok.pieces();
        let words: Vec<Vec<u8>> = pieces
            .iter()
            .enumerate()
            .map(|(id, b)| {
                let mut w = b.to_vec();
                if tok.is_special(id as u32) {
                    // the trie keeps control tokens apart from text
                    w.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
                }
                w
            })
            .collect();
        let eos = tok
            .eos
            .first()
            .copied()
            .ok_or("the tokenizer has no eos token")?;
        let mut info = TokRxInfo::new(words.len() as u32, eos);
        info.tok_bos = tok.bos;
        let mut trie = TokTrie::from(&info, &words);
        if tok.eos.len() > 1 {
            trie = trie.with_eos_tokens(&tok.eos);
        }
        let closing = Arc::new(Closing::new(&trie));
        let env: TokEnv = Arc::new(Env {
            trie,
            tok: tok.inner.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // errors go to clients: the problem, not the parser's state
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory,
            env,
            closing,
        })
    }

    /// Compile `c`; a schema or pattern the engine cannot use is `InvalidRequest`
    /// naming the problem.
    pub fn compile(&self, c: &Constraint) -> Result<Guide> {
        let grammar = c.grammar()?;
        // a panic in the grammar compiler is a fault of the server, not of the schema
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(grammar)
        }))
        .map_err(|_| {
            EngineError::Internal(format!("the grammar compiler failed on this {}", c.what()))
        })?
        .map_err(|e| EngineError::InvalidRequest(format!("cannot use this {}: {e}", c.what())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!(
                "cannot use this {}: {e}",
                c.what()
            )));
        }
        let json = matches!(c, Constraint::JsonObject | Constraint::JsonSchema { .. });
        Ok(Guide {
            matcher,
            json: json.then(JsonScan::default),
            env: self.env.clone(),
            closing: self.closing.clone(),
            wrapped: false,
        })
    }
}

/// One sequence's place in its grammar.
pub struct Guide {
    matcher: Matcher,
    /// JSON constraints: where the output stands (for the wrap-up).
    json: Option<JsonScan>,
    env: TokEnv,
    closing: Arc<Closing>,
    /// The wrap-up ran: the output was closed early to fit the budget.
    wrapped: bool,
}

impl Clone for Guide {
    /// An independent copy (its own lexer caches): `n` samples of one prompt.
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            json: self.json,
            env: self.env.clone(),
            closing: self.closing.clone(),
            wrapped: self.wrapped,
        }
    }
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// Tokens the grammar allows next.
pub struct Mask(SimpleVob);

impl Mask {
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.0.len() && self.0.is_allowed(id)
    }

    /// Set every disallowed logit to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_zero()
    }

    /// The allowed token ids, if there are at most `limit`.
    pub fn allowed(&self, limit: usize) -> Option<Vec<u32>> {
        let words = self.0.as_slice();
        let count: usize = words.iter().map(|w| w.count_ones() as usize).sum();
        if count > limit {
            return None;
        }
        let mut ids = Vec::with_capacity(count);
        for (wi, &bits) in words.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let j = b.trailing_zeros();
                let id = (wi * 32) as u32 + j;
                if (id as usize) < self.0.len() {
                    ids.push(id);
                }
                b &= b - 1;
            }
        }
        Some(ids)
    }
}

impl Guide {
    /// The tokens allowed next (only eos once the grammar is complete).
    pub fn mask(&mut self) -> Result<Mask> {
        self.matcher
            .compute_mask_or_eos()
            .map(Mask)
            .map_err(|e| EngineError::Internal(format!("grammar mask: {e}")))
    }

    /// Near the end of the token budget (`left` tokens), JSON is closed
    /// rather than cut: the tokens allowed narrow to those that end strings,
    /// objects and arrays (else the shortest values), so the output parses.
    /// `None` while there is room or for other grammars.
    pub fn wrap_up(&mut self, mask: &Mask, left: usize) -> Option<Mask> {
        let scan = self.json?;
        if left > scan.budget_to_close() {
            return None;
        }
        let c = &*self.closing;
        let classes = if scan.in_string {
            vec![&c.string_closers]
        } else {
            vec![&c.closers, &c.zero, &c.fillers]
        };
        for class in classes {
            let mut m = mask.0.clone();
            m.and(class);
            if !m.is_zero() {
                self.wrapped = true;
                return Some(Mask(m));
            }
        }
        None
    }

    /// The wrap-up closed this output early (its finish is `length`).
    pub fn wrapped(&self) -> bool {
        self.wrapped
    }

    /// Advance past a sampled token.
    pub fn commit(&mut self, id: u32) -> Result<()> {
        if let Some(scan) = &mut self.json {
            scan.push(self.env.tok_trie().token(id));
        }
        self.matcher
            .consume_token(id)
            .map_err(|e| EngineError::Internal(format!("grammar commit: {e}")))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}
