//! Curation rules, as pure functions: normalisation, PII scrubbing (emails,
//! phone numbers, card numbers that pass Luhn, IBANs that pass mod-97) and the
//! train/eval split by a hash of the normalised input, so an input never changes
//! side between snapshots.

use regex::Regex;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// Trim, and collapse every run of whitespace to one space.
pub fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Luhn checksum of a string of digits.
pub fn luhn_ok(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum % 10 == 0
}

/// ISO 13616 check: move the first four characters to the end, letters to
/// numbers (A = 10), the number mod 97 must be 1.
pub fn iban_ok(iban: &str) -> bool {
    let s: String = iban.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() < 15 || s.len() > 34 || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        let digits = if v >= 10 { 100 } else { 10 };
        rem = (rem * digits + v) % 97;
    }
    rem == 1
}

struct Patterns {
    email: Regex,
    iban: Regex,
    card: Regex,
    phone: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        let re = |s: &str| Regex::new(s).unwrap_or_else(|e| panic!("pattern {s}: {e}"));
        Patterns {
            email: re(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b"),
            iban: re(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b"),
            card: re(r"\b(?:[0-9][ -]?){12,18}[0-9]\b"),
            phone: re(r"(?:\+|\b)[0-9](?:[ ().-]?[0-9]){8,14}\b"),
        }
    })
}

/// What a scrub replaced, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scrubbed {
    pub emails: usize,
    pub ibans: usize,
    pub cards: usize,
    pub phones: usize,
}

impl Scrubbed {
    pub fn add(&mut self, o: Scrubbed) {
        self.emails += o.emails;
        self.ibans += o.ibans;
        self.cards += o.cards;
        self.phones += o.phones;
    }
}

/// Replace personal data with `[EMAIL]`, `[IBAN]`, `[CARD]`, `[PHONE]`. A card
/// or IBAN whose checksum fails is not one (an order number, say) and stays.
pub fn scrub(text: &str) -> (String, Scrubbed) {
    let p = patterns();
    let mut n = Scrubbed::default();
    let t = p.email.replace_all(text, |_: &regex::Captures<'_>| {
        n.emails += 1;
        "[EMAIL]".to_string()
    });
    let t = p.iban.replace_all(&t, |c: &regex::Captures<'_>| {
        if iban_ok(&c[0]) {
            n.ibans += 1;
            "[IBAN]".to_string()
        } else {
            c[0].to_string()
        }
    });
    // a long digit run that fails Luhn is kept whole: held aside so that the
    // phone pattern cannot take a part of it
    let mut held: Vec<String> = Vec::new();
    let t = p.card.replace_all(&t, |c: &regex::Captures<'_>| {
        let digits: String = c[0].chars().filter(char::is_ascii_digit).collect();
        if (13..=19).contains(&digits.len()) && luhn_ok(&digits) {
            n.cards += 1;
            "[CARD]".to_string()
        } else {
            held.push(c[0].to_string());
            format!("\u{E000}{}\u{E001}", letters(held.len() - 1))
        }
    });
    let t = p.phone.replace_all(&t, |c: &regex::Captures<'_>| {
        let digits = c[0].chars().filter(char::is_ascii_digit).count();
        if (9..=15).contains(&digits) {
            n.phones += 1;
            "[PHONE]".to_string()
        } else {
            c[0].to_string()
        }
    });
    let mut t = t.into_owned();
    for (i, orig) in held.iter().enumerate() {
        t = t.replacen(&format!("\u{E000}{}\u{E001}", letters(i)), orig, 1);
    }
    (t, n)
}

/// `i` written with the letters a..z (no digits, so no pattern sees a number).
fn letters(mut i: usize) -> String {
    let mut s = String::new();
    loop {
        s.push((b'a' + (i % 26) as u8) as char);
        i /= 26;
        if i == 0 {
            return s;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

/// sha256 hex of a normalised input: the key of dedupe, conflicts and the split.
pub fn input_key(normalised_input: &str) -> String {
    let d = Sha256::digest(normalised_input.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The side of an input: `eval_percent` of the key space is eval, the rest train.
pub fn split_of(key: &str, eval_percent: u8) -> Split {
    let bucket = u64::from_str_radix(&key[..key.len().min(8)], 16).unwrap_or(0) % 100;
    if bucket < u64::from(eval_percent) {
        Split::Eval
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_and_iban_checksums() {
        assert!(luhn_ok("4539578763621486"));
        assert!(!luhn_ok("4539578763621487"));
        assert!(luhn_ok("79927398713"));
        assert!(iban_ok("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_ok("DE89370400440532013000"));
        assert!(!iban_ok("DE89370400440532013001"));
        assert!(!iban_ok("GB82WEST"));
    }

    #[test]
    fn scrub_replaces_valid_personal_data_and_keeps_lookalikes() {
        let (t, n) = scrub(
            "mail ann.lee+x@example.co.uk, card 4539 5787 6362 1486, iban DE89 3704 0044 0532 0130 00, \
             call +44 20 7946 0958",
        );
        assert_eq!(t, "mail [EMAIL], card [CARD], iban [IBAN], call [PHONE]");
        assert_eq!(
            n,
            Scrubbed {
                emails: 1,
                ibans: 1,
                cards: 1,
                phones: 1
            }
        );
        // failed checksums: an order number and a mistyped IBAN stay as they are
        let (t, n) =
            scrub("order 4539 5787 6362 1487 ref DE89370400440532013001 at 12:30 on 2024-05-01");
        assert_eq!(n.cards + n.ibans, 0, "{t}");
        assert!(
            t.contains("4539 5787 6362 1487") && t.contains("DE89370400440532013001"),
            "{t}"
        );
        assert!(
            t.contains("2024-05-01"),
            "a date is not a phone number: {t}"
        );
    }

    #[test]
    fn the_split_depends_only_on_the_normalised_input() {
        let k = input_key(&normalise("  My card   was charged\ttwice "));
        assert_eq!(k, input_key("My card was charged twice"));
        let sides: Vec<Split> = (0..1000)
            .map(|i| split_of(&input_key(&format!("q{i}")), 10))
            .collect();
        let eval = sides.iter().filter(|s| **s == Split::Eval).count();
        assert!((60..=140).contains(&eval), "{eval} of 1000 in eval at 10%");
        assert_eq!(split_of(&k, 10), split_of(&k, 10));
    }
}
