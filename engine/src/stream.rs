//! Incremental detokenisation (never splits a UTF-8 character) and stop-string
//! matching that holds back text which might be the start of a stop string.

use crate::tokenizer::Tok;

#[derive(Default)]
pub struct Detok {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detok {
    /// Feed one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tok, id: u32) -> String {
        self.ids.push(id);
        let (Ok(before), Ok(after)) = (
            tok.decode(&self.ids[self.prefix..self.read], true),
            tok.decode(&self.ids[self.prefix..], true),
        ) else {
            return String::new();
        };
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && after.is_char_boundary(before.len())
        {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}

pub struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    /// The stop strings it watches for.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Add generated text; returns (text safe to emit, whether a stop string matched).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(i) = hit {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        let mut keep = 0;
        for s in &self.stops {
            for (end, _) in s.char_indices().skip(1) {
                if end > keep && self.held.ends_with(&s[..end]) {
                    keep = end;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Text held back at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_across_deltas() {
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), ("hello ".into(), false));
        assert_eq!(s.push("N"), ("".into(), false));
        assert_eq!(s.push("D tail"), ("".into(), true));
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("hello EN"), ("hello ".into(), false));
        assert_eq!(s.push("x"), ("ENx".into(), false));
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut s = StopText::new(vec![]);
        assert_eq!(s.push("é"), ("é".into(), false));
    }
}
