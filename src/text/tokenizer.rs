//! The CLIP BPE tokenizer, giving the same ids as transformers' `CLIPTokenizer` (5.x, which is
//! backed by the `tokenizers` library) on a diffusers `tokenizer/` folder.
//!
//! The pipeline it reproduces, step by step:
//!
//! 1. **Added (special) tokens** are cut out of the text first. Each one is matched either in
//!    the raw text (`normalized: false`) or, in a second pass, in the normalized text
//!    (`normalized: true`); matching is leftmost-longest. Which tokens are added, and with
//!    which flags, follows transformers' loading rules (see `SpecialTokens` below): this is why
//!    an SD 2.x tokenizer, whose pad token is `!`, turns every `!` of a prompt into id 0.
//! 2. **Normalization** of each remaining piece: Unicode NFC, every run of whitespace
//!    (Unicode `White_Space`) replaced by one space, then per-character lowercasing.
//! 3. **Pre-tokenization**: the pieces matched by CLIP's regex
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    are kept and the rest (spaces) dropped; each piece is split again by the byte-level
//!    (GPT-2) regex, which only matters for a literal `<|endoftext|>` that was not matched as an
//!    added token (it becomes `<|`, `endoftext`, `|>`); then each piece's UTF-8 bytes are mapped
//!    to the 256 printable "byte characters". Both regexes are implemented as a scanner over
//!    the Unicode classes (`\p{L}`, `\p{N}`, `\s`) of the regex engine's tables: no regex
//!    runs while encoding, so the first prompt of every thread is as fast as the next.
//! 4. **BPE** on each piece, with `</w>` appended to its last symbol; the lowest-ranked merge
//!    is applied first, leftmost on ties.
//! 5. **Post-processing**: `<|startoftext|>` + ids + `<|endoftext|>`; with truncation, the
//!    content is cut to `model_max_length - 2` ids before the two are added.
//!
//! Decoding maps the tokens back to bytes (a token holding a character outside the byte table
//! is taken as its own UTF-8), decodes them lossily, replaces `</w>` by a space and strips
//! the ends, as `CLIPTokenizer.decode` does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use regex_syntax::hir::{Class, HirKind};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

const END_OF_WORD: &str = "</w>";
/// `model_max_length` when the config gives none (or transformers' "unlimited" placeholder):
/// the number of positions of every CLIP text encoder.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Words whose BPE result is remembered (the same bound as the `tokenizers` library).
const CACHE_CAPACITY: usize = 10_000;
/// The named special tokens, in the order transformers registers them.
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The result of [`ClipTokenizer::encode_padded`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `model_max_length` ids: bos, the (possibly truncated) content, eos, padding.
    pub ids: Vec<u32>,
    /// The text cut by truncation, if any ids were cut (decoded from them, as diffusers'
    /// warning quotes it).
    pub truncated: Option<String>,
}

/// A token matched before BPE (a special token such as `<|endoftext|>`, or the SD 2.x pad `!`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddedToken {
    content: String,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl AddedToken {
    fn plain(content: &str) -> Self {
        AddedToken {
            content: content.to_string(),
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    /// A token as a config file writes it: a string (a special token, not normalized) or an
    /// object with `content` and flags; `normalized` defaults to "not special".
    fn from_json(v: &Value, special_default: bool) -> Option<Self> {
        match v {
            Value::String(s) => Some(AddedToken::plain(s)),
            Value::Object(m) => {
                let content = m.get("content")?.as_str()?.to_string();
                let flag = |k: &str| m.get(k).and_then(Value::as_bool);
                let special = flag("special").unwrap_or(special_default);
                Some(AddedToken {
                    content,
                    normalized: flag("normalized").unwrap_or(!special),
                    lstrip: flag("lstrip").unwrap_or(false),
                    rstrip: flag("rstrip").unwrap_or(false),
                    single_word: flag("single_word").unwrap_or(false),
                })
            }
            _ => None,
        }
    }
}

/// The special and added tokens that transformers' `from_pretrained` ends up registering, in
/// registration order (a later registration of the same content replaces the flags):
///
/// - with `added_tokens_decoder` in `tokenizer_config.json`: its entries (by id), then the named
///   tokens of the config (a name whose content is in `added_tokens_decoder` takes that entry);
///   `special_tokens_map.json` is then ignored;
/// - otherwise (the older diffusers files): the named tokens of `tokenizer_config.json`, each
///   replaced by the one in `special_tokens_map.json` when that file names it;
/// - names given nowhere take `CLIPTokenizer`'s defaults (`<|startoftext|>`, `<|endoftext|>`);
/// - the named tokens are registered in the order bos, eos, unk, sep, pad, cls, mask, then the
///   extra special tokens.
struct SpecialTokens {
    registrations: Vec<AddedToken>,
    named: HashMap<&'static str, String>,
    max_length: usize,
}

impl SpecialTokens {
    fn resolve(
        config: Option<(&Value, &Path)>,
        special_map: Option<(&Value, &Path)>,
    ) -> Result<Self> {
        fn object<'a>(
            v: Option<(&'a Value, &Path)>,
            empty: &'a serde_json::Map<String, Value>,
        ) -> Result<&'a serde_json::Map<String, Value>> {
            match v {
                None => Ok(empty),
                Some((Value::Object(m), _)) => Ok(m),
                Some((_, path)) => Err(Error::config(path, "expected a JSON object")),
            }
        }
        let empty = serde_json::Map::new();
        let cfg = object(config, &empty)?;
        let smap = object(special_map, &empty)?;
        let cfg_path = config.map(|(_, p)| p.to_path_buf()).unwrap_or_default();

        let mut named: Vec<Option<AddedToken>> = NAMED_TOKENS
            .iter()
            .map(|k| cfg.get(*k).and_then(|v| AddedToken::from_json(v, false)))
            .collect();
        let mut extras: Vec<AddedToken> = Vec::new();
        let mut extend_extras = |list: Option<&Value>, special_default: bool| {
            if let Some(Value::Array(items)) = list {
                for t in items
                    .iter()
                    .filter_map(|v| AddedToken::from_json(v, special_default))
                {
                    if !extras.iter().any(|e| e.content == t.content) {
                        extras.push(t);
                    }
                }
            }
        };
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            extend_extras(cfg.get(key), false);
        }

        let mut registrations = Vec::new();
        match cfg.get("added_tokens_decoder") {
            Some(Value::Object(decoder)) => {
                let mut entries = Vec::with_capacity(decoder.len());
                for (id, v) in decoder {
                    let id: u64 = id.parse().map_err(|_| {
                        Error::config(&cfg_path, format!("added_tokens_decoder: bad id `{id}`"))
                    })?;
                    let tok = AddedToken::from_json(v, false).ok_or_else(|| {
                        Error::config(&cfg_path, format!("added_tokens_decoder: bad entry {id}"))
                    })?;
                    entries.push((id, tok));
                }
                entries.sort_by_key(|(id, _)| *id);
                for slot in named.iter_mut().flatten() {
                    if let Some((_, t)) = entries.iter().find(|(_, t)| t.content == slot.content) {
                        *slot = t.clone();
                    }
                }
                registrations.extend(entries.into_iter().map(|(_, t)| t));
            }
            Some(_) => {
                return Err(Error::config(
                    &cfg_path,
                    "added_tokens_decoder: expected an object",
                ))
            }
            None => {
                for (slot, key) in named.iter_mut().zip(NAMED_TOKENS) {
                    if let Some(v) = smap.get(key) {
                        if let Some(t) = AddedToken::from_json(v, true) {
                            *slot = Some(t);
                        }
                    }
                }
                for key in ["additional_special_tokens", "extra_special_tokens"] {
                    extend_extras(smap.get(key), true);
                }
            }
        }

        let defaults = [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ];
        let mut names = HashMap::new();
        for (slot, key) in named.iter_mut().zip(NAMED_TOKENS) {
            if slot.is_none() {
                if let Some((_, d)) = defaults.iter().find(|(k, _)| *k == key) {
                    *slot = Some(AddedToken::plain(d));
                }
            }
            if let Some(t) = slot {
                names.insert(key, t.content.clone());
            }
        }
        registrations.extend(named.into_iter().flatten());
        registrations.extend(extras);

        let max_length = match cfg.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_u64() {
                Some(n) if (2..=1 << 20).contains(&n) => n as usize,
                // transformers writes a huge number for "no limit"
                Some(n) if n > 1 << 20 => DEFAULT_MAX_LENGTH,
                None if v.as_f64().is_some_and(|f| f > (1u64 << 20) as f64) => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(Error::config(
                        &cfg_path,
                        format!("model_max_length must be an integer of at least 2, found {v}"),
                    ))
                }
            },
        };
        Ok(SpecialTokens {
            registrations,
            named: names,
            max_length,
        })
    }
}

/// A set of added tokens matched together (leftmost-longest), with their ids.
struct MatchSet {
    tokens: Vec<(String, u32, AddedToken)>,
}

enum Piece<'a> {
    Text(&'a str),
    Token(u32),
}

impl MatchSet {
    /// Splits `text` into added tokens and the text between them (empty text yields one empty
    /// piece, which encodes to nothing).
    fn split<'a>(&self, text: &'a str) -> Vec<Piece<'a>> {
        if self.tokens.is_empty() {
            return vec![Piece::Text(text)];
        }
        let mut out = Vec::new();
        let mut done = 0; // end of the last accepted split
        let mut pos = 0; // where the next search starts
        while pos < text.len() {
            let Some((start, len, idx)) = self.find_at(text, pos) else {
                break;
            };
            let (mut s, mut e) = (start, start + len);
            pos = e;
            let tok = &self.tokens[idx].2;
            if tok.single_word {
                let before = start == 0 || !ends_with_word(&text[..start]);
                let after = e == text.len() || !starts_with_word(&text[e..]);
                if !(before && after) {
                    continue;
                }
            }
            if tok.lstrip {
                let trimmed = text[..s].trim_end_matches(|c| tables().is_space(c)).len();
                s = trimmed.max(done);
            }
            if tok.rstrip {
                let rest = &text[e..];
                e += rest.len() - rest.trim_start_matches(|c| tables().is_space(c)).len();
                pos = e;
            }
            if done < s {
                out.push(Piece::Text(&text[done..s]));
            }
            out.push(Piece::Token(self.tokens[idx].1));
            done = e;
        }
        if done < text.len() || out.is_empty() {
            out.push(Piece::Text(&text[done..]));
        }
        out
    }

    /// The leftmost match starting at or after `from`, the longest among those at that start.
    fn find_at(&self, text: &str, from: usize) -> Option<(usize, usize, usize)> {
        let bytes = text.as_bytes();
        for start in from..text.len() {
            if !text.is_char_boundary(start) {
                continue;
            }
            let mut best: Option<(usize, usize)> = None;
            for (i, (pat, _, _)) in self.tokens.iter().enumerate() {
                if !pat.is_empty()
                    && bytes[start..].starts_with(pat.as_bytes())
                    && best.is_none_or(|(l, _)| pat.len() > l)
                {
                    best = Some((pat.len(), i));
                }
            }
            if let Some((len, i)) = best {
                return Some((start, len, i));
            }
        }
        None
    }
}

/// The Unicode classes the pre-tokenizer and the added-token matching use, as sorted
/// code point ranges taken from the regex engine's own tables (the same classes as the
/// `\p{L}`, `\p{N}`, `\s` and `\w` of a regex), so that scanning needs no regex.
struct CharTables {
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
    word: Vec<(char, char)>,
    ascii: [CharClass; 128],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

fn class_ranges(pattern: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("a valid Unicode class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start(), r.end()))
            .collect(),
        other => panic!("`{pattern}` is not a Unicode class: {other:?}"),
    }
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn tables() -> &'static CharTables {
    static TABLES: OnceLock<CharTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = CharTables {
            letter: class_ranges(r"\p{L}"),
            number: class_ranges(r"\p{N}"),
            space: class_ranges(r"\s"),
            word: class_ranges(r"\w"),
            ascii: [CharClass::Other; 128],
        };
        for b in 0u8..128 {
            t.ascii[b as usize] = t.classify_slow(char::from(b));
        }
        t
    })
}

impl CharTables {
    fn classify_slow(&self, c: char) -> CharClass {
        if in_ranges(&self.space, c) {
            CharClass::Space
        } else if in_ranges(&self.letter, c) {
            CharClass::Letter
        } else if in_ranges(&self.number, c) {
            CharClass::Number
        } else {
            CharClass::Other
        }
    }

    fn class(&self, c: char) -> CharClass {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            self.classify_slow(c)
        }
    }

    fn is_space(&self, c: char) -> bool {
        self.class(c) == CharClass::Space
    }

    fn is_word(&self, c: char) -> bool {
        in_ranges(&self.word, c)
    }
}

fn starts_with_word(s: &str) -> bool {
    s.chars().next().is_some_and(|c| tables().is_word(c))
}

fn ends_with_word(s: &str) -> bool {
    s.chars().next_back().is_some_and(|c| tables().is_word(c))
}

/// The pieces of normalized text, as CLIP's pre-tokenizer splits it: the matches of
/// `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
/// (leftmost-first, whitespace dropped), each then split by the byte-level (GPT-2) pattern.
/// The second split only changes the two literal special tokens (into `<|`, the name, `|>`):
/// CLIP's pieces contain no whitespace, and on such text every other piece is a single
/// GPT-2 match.
fn pre_tokenize<'a>(text: &'a str, mut emit: impl FnMut(&'a str)) {
    const SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let t = tables();
    let mut i = 0;
    while let Some(c) = text[i..].chars().next() {
        let rest = &text[i..];
        if let Some(sp) = SPECIALS.iter().find(|sp| rest.starts_with(*sp)) {
            emit(&rest[..2]);
            emit(&rest[2..sp.len() - 2]);
            emit(&rest[sp.len() - 2..sp.len()]);
            i += sp.len();
            continue;
        }
        if c == '\'' {
            if let Some(k) = CONTRACTIONS.iter().find(|k| rest.starts_with(*k)) {
                emit(&rest[..k.len()]);
                i += k.len();
                continue;
            }
        }
        let class = t.class(c);
        let len = match class {
            CharClass::Space => {
                i += c.len_utf8();
                continue;
            }
            CharClass::Number => c.len_utf8(),
            CharClass::Letter | CharClass::Other => rest
                .char_indices()
                .find(|&(_, d)| t.class(d) != class)
                .map_or(rest.len(), |(j, _)| j),
        };
        emit(&rest[..len]);
        i += len;
    }
}

/// The byte-level alphabet: byte `b` is written as `BYTE_CHARS[b]` (printable Latin-1 bytes as
/// themselves, the others as U+0100 onwards, in byte order).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        *slot = if printable {
            char::from(b as u8)
        } else {
            let c = char::from_u32(next).expect("valid char");
            next += 1;
            c
        };
    }
    table
}

/// Python's `str.isspace`, which `str.strip` uses (wider than Unicode `White_Space`: it also
/// takes the information separators U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\u{1c}'..='\u{20}' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// A fast multiplicative hasher for the vocabulary and merge tables, whose keys come from the
/// model files (the per-word cache, whose keys come from prompts, keeps the default hasher).
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        // fold the high bits, where the multiplications leave their entropy, into the low
        // bits that pick the bucket
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// The CLIP BPE tokenizer (see the module documentation for the exact pipeline).
pub struct ClipTokenizer {
    /// id -> token text (model vocabulary, overridden by added tokens); `None` for unused ids.
    id_to_token: Vec<Option<String>>,
    vocab_size: usize,
    /// (left id, right id) -> (rank, merged id).
    merges: FastMap<(u32, u32), (u32, u32)>,
    /// Symbol id of each byte inside a word, and at its end (with `</w>`).
    byte_ids: [Option<u32>; 256],
    byte_end_ids: [Option<u32>; 256],
    /// Byte-level character -> byte, for decoding.
    char_bytes: HashMap<char, u8>,
    raw_tokens: MatchSet,
    normalized_tokens: MatchSet,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: Option<u32>,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("model_max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn parse_json(text: &str, path: &Path) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl ClipTokenizer {
    /// Loads vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json from a
    /// diffusers `tokenizer/` folder. vocab.json and merges.txt are required (a missing one is an
    /// error naming it); the two config files are read when present, and an absent one means
    /// `CLIPTokenizer`'s defaults (pad = eos = `<|endoftext|>`, 77 positions).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = read_text(&vocab_path)?;
        let merges = read_text(&merges_path)?;
        let optional = |name: &str| -> Result<Option<(String, PathBuf)>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some((s, path))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            }
        };
        let config = optional("tokenizer_config.json")?;
        let special = optional("special_tokens_map.json")?;
        Self::build(
            (&vocab, &vocab_path),
            (&merges, &merges_path),
            config.as_ref().map(|(s, p)| (s.as_str(), p.as_path())),
            special.as_ref().map(|(s, p)| (s.as_str(), p.as_path())),
        )
    }

    /// From in-memory file contents (for a model embedded in the binary). Errors name the file
    /// the content stands for (`vocab.json`, `merges.txt`, ...).
    pub fn from_parts(
        vocab_json: &str,
        merges_txt: &str,
        tokenizer_config_json: Option<&str>,
        special_tokens_map_json: Option<&str>,
    ) -> Result<Self> {
        Self::build(
            (vocab_json, Path::new("vocab.json")),
            (merges_txt, Path::new("merges.txt")),
            tokenizer_config_json.map(|s| (s, Path::new("tokenizer_config.json"))),
            special_tokens_map_json.map(|s| (s, Path::new("special_tokens_map.json"))),
        )
    }

    fn build(
        (vocab_json, vocab_path): (&str, &Path),
        (merges_txt, merges_path): (&str, &Path),
        config: Option<(&str, &Path)>,
        special_map: Option<(&str, &Path)>,
    ) -> Result<Self> {
        let vocab: FastMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|source| Error::Json {
                path: vocab_path.to_path_buf(),
                source,
            })?;
        if vocab.is_empty() {
            return Err(Error::config(vocab_path, "empty vocabulary"));
        }

        let mut merges =
            FastMap::with_capacity_and_hasher(merges_txt.len() / 10, Default::default());
        let mut joined = String::new();
        let mut rank = 0u32;
        for (line_no, line) in merges_txt.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let bad =
                |what: String| Error::config(merges_path, format!("line {}: {what}", line_no + 1));
            let mut parts = line.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!(
                    "expected two tokens separated by a space, found `{line}`"
                )));
            };
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| bad(format!("token `{t}` is not in vocab.json")))
            };
            let (a_id, b_id) = (id(a)?, id(b)?);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let new_id = id(&joined)?;
            merges.insert((a_id, b_id), (rank, new_id));
            rank += 1;
        }

        let config = config
            .map(|(s, p)| parse_json(s, p).map(|v| (v, p)))
            .transpose()?;
        let special_map = special_map
            .map(|(s, p)| parse_json(s, p).map(|v| (v, p)))
            .transpose()?;
        let specials = SpecialTokens::resolve(
            config.as_ref().map(|(v, p)| (v, *p)),
            special_map.as_ref().map(|(v, p)| (v, *p)),
        )?;

        let byte_chars = byte_chars();
        let mut byte_ids = [None; 256];
        let mut byte_end_ids = [None; 256];
        let mut char_bytes = HashMap::with_capacity(256);
        for (b, &c) in byte_chars.iter().enumerate() {
            let mut s = c.to_string();
            byte_ids[b] = vocab.get(&s).copied();
            s.push_str(END_OF_WORD);
            byte_end_ids[b] = vocab.get(&s).copied();
            char_bytes.insert(c, b as u8);
        }

        // Register the added tokens as the `tokenizers` library does: a content keeps the id it
        // first got (its vocabulary id, or the next id after the vocabulary), and its latest
        // flags.
        let vocab_len = vocab.len() as u32;
        let mut added: Vec<(u32, AddedToken)> = Vec::new();
        for tok in specials.registrations {
            if tok.content.is_empty() {
                continue;
            }
            if let Some(slot) = added.iter_mut().find(|(_, t)| t.content == tok.content) {
                slot.1 = tok;
                continue;
            }
            let id = vocab.get(&tok.content).copied().unwrap_or_else(|| {
                match added.iter().map(|(i, _)| *i).max() {
                    Some(max) if max >= vocab_len => max + 1,
                    _ => vocab_len,
                }
            });
            added.push((id, tok));
        }
        let added_id = |content: &str| {
            added
                .iter()
                .find(|(_, t)| t.content == content)
                .map(|(i, _)| *i)
        };
        let named_id = |key: &str| specials.named.get(key).and_then(|c| added_id(c));
        let cfg_path = config
            .as_ref()
            .map(|(_, p)| p.to_path_buf())
            .unwrap_or_default();
        let require = |key: &str| {
            named_id(key).ok_or_else(|| Error::config(&cfg_path, format!("no `{key}`")))
        };
        let (bos, eos, pad) = (
            require("bos_token")?,
            require("eos_token")?,
            require("pad_token")?,
        );
        let unk = named_id("unk_token");

        // The vocabulary is only needed by id from now on.
        let vocab_size = vocab.len();
        let max_id = vocab
            .values()
            .chain(added.iter().map(|(i, _)| i))
            .copied()
            .max();
        let max_id = max_id.map_or(0, |m| m as usize);
        if max_id >= 4 * vocab_size + (1 << 16) {
            return Err(Error::config(
                vocab_path,
                format!("id {max_id} is far beyond the {vocab_size} entries"),
            ));
        }
        let mut id_to_token: Vec<Option<String>> = vec![None; max_id + 1];
        for (token, id) in vocab {
            id_to_token[id as usize] = Some(token);
        }
        for (id, tok) in &added {
            id_to_token[*id as usize] = Some(tok.content.clone());
        }

        let mut raw_tokens = MatchSet { tokens: Vec::new() };
        let mut normalized_tokens = MatchSet { tokens: Vec::new() };
        for (id, tok) in added {
            if tok.normalized {
                let pattern = normalize(&tok.content);
                normalized_tokens.tokens.push((pattern, id, tok));
            } else {
                raw_tokens.tokens.push((tok.content.clone(), id, tok));
            }
        }

        Ok(ClipTokenizer {
            id_to_token,
            vocab_size,
            merges,
            byte_ids,
            byte_end_ids,
            char_bytes,
            raw_tokens,
            normalized_tokens,
            bos,
            eos,
            pad,
            unk,
            max_length: specials.max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The padded length (`model_max_length` of tokenizer_config.json; 77 for every SD model).
    pub fn model_max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The number of entries of vocab.json.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token of the vocabulary (or of an added token), if any. A linear search,
    /// meant for tests and diagnostics.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id_to_token
            .iter()
            .position(|t| t.as_deref() == Some(token))
            .map(|i| i as u32)
    }

    /// bos + BPE ids + eos, untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        ids.push(self.bos);
        self.encode_content(text, &mut ids);
        ids.push(self.eos);
        ids
    }

    /// BPE ids without BOS and EOS, untruncated (A1111 tokenizes each piece of a weighted
    /// prompt this way).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.encode_content(text, &mut ids);
        ids
    }

    /// What diffusers feeds the text encoder: truncated to `model_max_length` (keeping eos
    /// last) and padded with the pad token.
    pub fn encode_padded(&self, text: &str) -> Encoded {
        let mut content = Vec::with_capacity(self.max_length);
        self.encode_content(text, &mut content);
        let keep = self.max_length.saturating_sub(2);
        let truncated = (content.len() > keep).then(|| self.decode(&content[keep..]));
        content.truncate(keep);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&content);
        ids.push(self.eos);
        ids.resize(self.max_length.max(ids.len()), self.pad);
        Encoded { ids, truncated }
    }

    /// Decodes ids back to text (special tokens included, as their text), as
    /// `CLIPTokenizer.decode` does: `</w>` becomes a space and the ends are stripped. Unknown
    /// ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            let Some(Some(token)) = self.id_to_token.get(*id as usize) else {
                continue;
            };
            let start = bytes.len();
            let mut all_mapped = true;
            for c in token.chars() {
                match self.char_bytes.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => {
                        all_mapped = false;
                        break;
                    }
                }
            }
            if !all_mapped {
                bytes.truncate(start);
                bytes.extend_from_slice(token.as_bytes());
            }
        }
        let text = String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ");
        text.trim_matches(py_isspace).to_string()
    }

    /// The ids of `text` without bos/eos, appended to `out`.
    fn encode_content(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.raw_tokens.split(text) {
            match piece {
                Piece::Token(id) => out.push(id),
                Piece::Text(t) => {
                    let normalized = normalize(t);
                    for piece in self.normalized_tokens.split(&normalized) {
                        match piece {
                            Piece::Token(id) => out.push(id),
                            Piece::Text(t) => self.encode_normalized(t, out),
                        }
                    }
                }
            }
        }
    }

    /// Pre-tokenization and BPE of normalized text.
    fn encode_normalized(&self, text: &str, out: &mut Vec<u32>) {
        pre_tokenize(text, |word| self.bpe_cached(word, out));
    }

    fn bpe_cached(&self, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() < CACHE_CAPACITY {
                cache.insert(word.to_string(), ids);
            }
        }
    }

    /// BPE of one pre-tokenized word: its bytes as symbols (the last with `</w>`), then the
    /// lowest-ranked adjacent pair merged, leftmost first, until no pair has a merge. The
    /// candidate pairs sit in a heap ordered by (rank, position), so a long word costs
    /// O(n log n), not O(n²).
    fn bpe(&self, word: &str) -> Vec<u32> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        const NONE: usize = usize::MAX;

        let bytes = word.as_bytes();
        let last = bytes.len() - 1;
        let mut ids: Vec<u32> = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            let id = if i == last {
                self.byte_end_ids[b as usize]
            } else {
                self.byte_ids[b as usize]
            };
            if let Some(id) = id.or(self.unk) {
                ids.push(id);
            }
        }
        let n = ids.len();
        if n < 2 {
            return ids;
        }
        // a doubly linked list over the symbols; merged-away symbols are marked dead
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(&(rank, _)) = self.merges.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let right = next[pos];
            if !alive[pos] || right == NONE {
                continue;
            }
            // skip entries for pairs that an earlier merge has changed
            let Some(&(r, merged)) = self.merges.get(&(ids[pos], ids[right])) else {
                continue;
            };
            if r != rank {
                continue;
            }
            ids[pos] = merged;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] != NONE {
                prev[next[pos]] = pos;
            }
            if prev[pos] != NONE {
                if let Some(&(r, _)) = self.merges.get(&(ids[prev[pos]], ids[pos])) {
                    heap.push(Reverse((r, prev[pos])));
                }
            }
            if next[pos] != NONE {
                if let Some(&(r, _)) = self.merges.get(&(ids[pos], ids[next[pos]])) {
                    heap.push(Reverse((r, pos)));
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i != NONE {
            out.push(ids[i]);
            i = next[i];
        }
        out
    }
}

/// NFC, whitespace runs to one space, per-character lowercase.
fn normalize(text: &str) -> String {
    let t = tables();
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    let mut push = |c: char, out: &mut String| {
        if t.is_space(c) {
            if !in_space {
                out.push(' ');
                in_space = true;
            }
        } else {
            in_space = false;
            if c.is_ascii() {
                out.push(c.to_ascii_lowercase());
            } else {
                out.extend(c.to_lowercase());
            }
        }
    };
    if text.is_ascii() {
        // NFC leaves ASCII text as it is
        text.chars().for_each(|c| push(c, &mut out));
    } else {
        text.nfc().for_each(|c| push(c, &mut out));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: the 256 byte characters (with and without `</w>`), merges for
    /// "lo", "low</w>", "er</w>", and the two special tokens.
    fn tiny() -> ClipTokenizer {
        let chars = byte_chars();
        let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
        let merges = ["l o", "lo w</w>", "e r</w>", "lo w"];
        for m in merges {
            vocab.push(m.replace(' ', ""));
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let vocab_json = serde_json::to_string(
            &vocab
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect::<HashMap<_, _>>(),
        )
        .unwrap();
        let merges_txt = format!("#version: 0.2\n{}\n", merges.join("\n"));
        ClipTokenizer::from_parts(&vocab_json, &merges_txt, None, None).unwrap()
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[0], '\u{100}');
    }

    fn pieces(text: &str) -> Vec<&str> {
        let mut v = Vec::new();
        pre_tokenize(text, |p| v.push(p));
        v
    }

    #[test]
    fn pre_tokenizes_like_clip() {
        assert_eq!(
            pieces("it's a cat's toy"),
            ["it", "'s", "a", "cat", "'s", "toy"]
        );
        assert_eq!(pieces("''s 'sa x'y"), ["''", "s", "'s", "a", "x", "'", "y"]);
        assert_eq!(
            pieces("3.14 1234"),
            ["3", ".", "1", "4", "1", "2", "3", "4"]
        );
        assert_eq!(pieces("!<|endoftext|>x"), ["!<|", "endoftext", "|>", "x"]);
        assert_eq!(
            pieces("a<|startoftext|>b"),
            ["a", "<|", "startoftext", "|>", "b"]
        );
        assert_eq!(pieces("  naïve\u{3000}ⅻ²  "), ["naïve", "ⅻ", "²"]);
        assert_eq!(pieces("\u{1c}x\u{200b}y"), ["\u{1c}", "x", "\u{200b}", "y"]);
        assert_eq!(pieces("i\u{307}stanbul"), ["i", "\u{307}", "stanbul"]);
        assert!(pieces("").is_empty() && pieces(" \t ").is_empty());
    }

    #[test]
    fn normalizes_like_clip() {
        assert_eq!(normalize("  A\u{301}b\t\n C  "), " áb c ");
        assert_eq!(normalize("ΟΔΟΣ"), "οδοσ");
        assert_eq!(normalize("İ"), "i\u{307}");
    }

    #[test]
    fn bpe_merges_lowest_rank_first() {
        let t = tiny();
        let low = t.token_to_id("low</w>").unwrap();
        let low_inner = t.token_to_id("low").unwrap();
        let er = t.token_to_id("er</w>").unwrap();
        assert_eq!(t.encode("low"), vec![t.bos_id(), low, t.eos_id()]);
        // "l o" (rank 0), then "e r</w>" (rank 2) before "lo w" (rank 3)
        assert_eq!(
            t.encode("LOWER"),
            vec![t.bos_id(), low_inner, er, t.eos_id()]
        );
        assert_eq!(
            t.decode(&t.encode("Low lower")),
            "<|startoftext|>low lower <|endoftext|>"
        );
        assert_eq!(t.pad_id(), t.eos_id());
        assert_eq!(t.model_max_length(), 77);
    }

    #[test]
    fn pads_and_truncates() {
        let t = tiny();
        let e = t.encode_padded("low");
        assert_eq!(e.ids.len(), 77);
        assert_eq!(e.truncated, None);
        let long = vec!["low"; 80].join(" ");
        let e = t.encode_padded(&long);
        assert_eq!(e.ids.len(), 77);
        assert_eq!(*e.ids.last().unwrap(), t.eos_id());
        assert_eq!(e.truncated.as_deref(), Some("low low low low low"));
    }

    #[test]
    fn special_tokens_split_the_text() {
        let t = tiny();
        let eos = t.eos_id();
        let low = t.token_to_id("low</w>").unwrap();
        assert_eq!(
            t.encode("low<|endoftext|>low"),
            vec![t.bos_id(), low, eos, low, eos]
        );
    }

    #[test]
    fn bad_merges_name_the_file() {
        let err = ClipTokenizer::from_parts("{\"a\":0}", "a b\n", None, None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("merges.txt"), "{msg}");
        let err = ClipTokenizer::from_parts("not json", "", None, None).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");
    }
}
