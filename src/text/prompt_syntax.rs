//! AUTOMATIC1111's prompt syntax, which prompts shared for Stable Diffusion are written in:
//!
//! - `(words)` multiplies their weight by 1.1, `[words]` divides it by 1.1, `(words:1.5)` sets
//!   the factor; brackets nest and multiply; `\(` `\)` `\[` `\]` are literal brackets; an
//!   unclosed bracket applies to the rest of the prompt, an unopened closing one is text;
//! - `BREAK` starts a new 75-token chunk;
//! - prompts longer than 75 tokens are split into chunks of 75 (each encoded on its own as
//!   BOS + 75 + EOS, the encodings concatenated), a chunk boundary moved back to just after a
//!   comma within the last 20 tokens;
//! - a token's weight scales its encoded vector, and each chunk is then rescaled so that its
//!   mean is unchanged (A1111's "Original" emphasis).
//!
//! Parsing follows A1111's `parse_prompt_attention`, chunking its `tokenize_line`.

/// A piece of a parsed prompt: text and its weight, or a BREAK.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String, f64),
    Break,
}

/// The factor of one pair of round brackets (square ones divide by it).
const BRACKET: f64 = 1.1;
/// Tokens per chunk, between its BOS and EOS, for CLIP's 77 positions (a text encoder with
/// fewer, as the built-in model's 32, takes chunks of its own length less 2).
pub const CHUNK_TOKENS: usize = 75;
/// How far back from a chunk's end a comma may move the boundary.
const COMMA_BACKTRACK: usize = 20;

/// One lexical unit of A1111's attention grammar.
enum Lexeme<'a> {
    /// `\(` and the like: the character itself (`\` alone: nothing).
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.5)`: the weight's text (and the whole match, should no bracket be open).
    Weight(&'a str, &'a str),
    Close,
    CloseSquare,
    Text(&'a str),
}

fn lex(text: &str) -> Vec<Lexeme<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < text.len() {
        let rest = &text[i..];
        let (lexeme, len) = match bytes[i] {
            b'\\' => match rest.as_bytes().get(1) {
                Some(b'(' | b')' | b'[' | b']' | b'\\') => (Lexeme::Escaped(&rest[1..2]), 2),
                _ => (Lexeme::Escaped(""), 1),
            },
            b'(' => (Lexeme::Open, 1),
            b'[' => (Lexeme::OpenSquare, 1),
            b')' => (Lexeme::Close, 1),
            b']' => (Lexeme::CloseSquare, 1),
            b':' => match weight_at(rest) {
                Some((weight, len)) => (Lexeme::Weight(weight, &rest[..len]), len),
                None => (Lexeme::Text(":"), 1),
            },
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                (Lexeme::Text(&rest[..len]), len)
            }
        };
        out.push(lexeme);
        i += len;
    }
    out
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the number's text and the match's length.
fn weight_at(s: &str) -> Option<(&str, usize)> {
    let after_colon = &s[1..];
    let start = 1 + (after_colon.len() - after_colon.trim_start().len());
    let body = &s[start..];
    let sign = usize::from(body.starts_with(['+', '-']));
    let digits = body[sign..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len() - sign);
    if digits == 0 {
        return None;
    }
    let number_end = start + sign + digits;
    let after = &s[number_end..];
    let close = number_end + (after.len() - after.trim_start().len());
    (s[close..].starts_with(')')).then(|| (&s[start..number_end], close + 1))
}

/// Splits on `\s*\bBREAK\b\s*` as Python's `re.split` does (empty parts kept).
fn split_breaks(text: &str) -> Vec<&str> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if word(before) || word(after) {
            search = end;
            continue;
        }
        let trimmed_start = text[part_start..at].trim_end().len() + part_start;
        parts.push(&text[part_start..trimmed_start]);
        let rest = &text[end..];
        part_start = end + (rest.len() - rest.trim_start().len());
        search = part_start;
    }
    parts.push(&text[part_start..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as pieces of equal weight, in order.
pub fn parse(text: &str) -> Vec<Piece> {
    // Weights as A1111 keeps them: a BREAK is the text "BREAK" of weight -1.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            piece.1 *= by;
        }
    };
    for lexeme in lex(text) {
        match lexeme {
            Lexeme::Escaped(c) => res.push((c.to_string(), 1.0)),
            Lexeme::Open => round.push(res.len()),
            Lexeme::OpenSquare => square.push(res.len()),
            Lexeme::Weight(w, whole) => match (w.parse::<f64>(), round.last()) {
                (Ok(w), Some(_)) => {
                    let from = round.pop().expect("checked");
                    multiply(&mut res, from, w);
                }
                // No bracket to close, or a number Python would not read ("1.2.3"): text.
                _ => push_text(&mut res, whole),
            },
            Lexeme::Close if !round.is_empty() => {
                let from = round.pop().expect("checked");
                multiply(&mut res, from, BRACKET);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked");
                multiply(&mut res, from, 1.0 / BRACKET);
            }
            Lexeme::Close => push_text(&mut res, ")"),
            Lexeme::CloseSquare => push_text(&mut res, "]"),
            Lexeme::Text(t) => push_text(&mut res, t),
        }
    }
    for from in round {
        multiply(&mut res, from, BRACKET);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / BRACKET);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Neighbours of equal weight merge (A1111 compares the floats exactly).
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged
        .into_iter()
        .map(|(text, weight)| {
            if text == "BREAK" && weight == -1.0 {
                Piece::Break
            } else {
                Piece::Text(text, weight)
            }
        })
        .collect()
}

fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    for (i, part) in split_breaks(text).into_iter().enumerate() {
        if i > 0 {
            res.push(("BREAK".into(), -1.0));
        }
        res.push((part.to_string(), 1.0));
    }
}

/// One chunk: BOS + 75 tokens + EOS (padded with EOS), and each token's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Where textual-inversion embeddings go: (position in `ids`, embedding index); the
    /// embedding's vectors replace the placeholder ids from there on.
    pub embeddings: Vec<(usize, usize)>,
}

impl Chunk {
    /// Whether every weight is 1 (the encoding is then used as it is).
    pub fn is_plain(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// The tokens A1111's chunking needs from a tokenizer.
pub struct ChunkTokens {
    pub bos: u32,
    pub eos: u32,
    pub comma: Option<u32>,
    /// Tokens between BOS and EOS ([`CHUNK_TOKENS`] for CLIP).
    pub per_chunk: usize,
}

/// A textual-inversion embedding as chunking sees it: the ids its name tokenizes to (where
/// they appear in a prompt, the embedding goes), and how many vectors it puts there.
#[derive(Clone, Debug)]
pub struct EmbeddingName {
    pub ids: Vec<u32>,
    pub vectors: usize,
}

/// The chunk being filled, and the finished ones.
struct Builder<'a> {
    t: &'a ChunkTokens,
    per_chunk: usize,
    tokens: Vec<u32>,
    weights: Vec<f32>,
    embeddings: Vec<(usize, usize)>,
    last_comma: Option<usize>,
    done: Vec<Chunk>,
}

impl Builder<'_> {
    fn finish(&mut self) {
        let pad = self.per_chunk.saturating_sub(self.tokens.len());
        let mut ids = Vec::with_capacity(self.per_chunk + 2);
        ids.push(self.t.bos);
        ids.append(&mut self.tokens);
        ids.extend(std::iter::repeat_n(self.t.eos, pad + 1));
        let mut weights = Vec::with_capacity(self.per_chunk + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.extend(std::iter::repeat_n(1.0, pad + 1));
        let embeddings = self
            .embeddings
            .drain(..)
            .map(|(at, e)| (at + 1, e))
            .collect();
        self.done.push(Chunk {
            ids,
            weights,
            embeddings,
        });
        self.last_comma = None;
    }

    /// Ends the chunk at its last comma, carrying what follows into the next.
    fn break_at_comma(&mut self, comma: usize) {
        let keep = comma + 1;
        let moved = self.tokens.split_off(keep);
        let moved_weights = self.weights.split_off(keep);
        let (stay, go): (Vec<_>, Vec<_>) = self.embeddings.iter().partition(|(at, _)| *at < keep);
        self.embeddings = stay;
        self.finish();
        self.tokens = moved;
        self.weights = moved_weights;
        self.embeddings = go.into_iter().map(|(at, e)| (at - keep, e)).collect();
    }
}

/// The embedding whose name starts at `ids[at]` (the longest, if several): its index and the
/// number of ids its name takes.
fn embedding_at(ids: &[u32], at: usize, names: &[EmbeddingName]) -> Option<(usize, usize)> {
    names
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.ids.is_empty() && ids[at..].starts_with(&n.ids))
        .max_by_key(|(_, n)| n.ids.len())
        .map(|(i, n)| (i, n.ids.len()))
}

/// A1111's `tokenize_line`: the parsed pieces' tokens (`tokenize` gives a piece's ids, without
/// BOS/EOS) laid into chunks, with `embeddings` found by their names' ids.
pub fn chunks(
    pieces: &[Piece],
    tokenize: impl Fn(&str) -> Vec<u32>,
    t: &ChunkTokens,
    embeddings: &[EmbeddingName],
) -> Vec<Chunk> {
    let per_chunk = t.per_chunk.max(1);
    let mut b = Builder {
        t,
        per_chunk,
        tokens: Vec::new(),
        weights: Vec::new(),
        embeddings: Vec::new(),
        last_comma: None,
        done: Vec::new(),
    };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                b.finish();
                continue;
            }
            Piece::Text(text, weight) => (text, *weight as f32),
        };
        let ids = tokenize(text);
        let mut at = 0;
        while at < ids.len() {
            let id = ids[at];
            if Some(id) == t.comma {
                b.last_comma = Some(b.tokens.len());
            } else if b.tokens.len() == per_chunk {
                let len = b.tokens.len();
                if let Some(comma) = b.last_comma.filter(|&c| len - c <= COMMA_BACKTRACK) {
                    b.break_at_comma(comma);
                }
            }
            if b.tokens.len() == per_chunk {
                b.finish();
            }
            if let Some((e, name_len)) = embedding_at(&ids, at, embeddings) {
                let vectors = embeddings[e].vectors.min(per_chunk);
                if b.tokens.len() + vectors > per_chunk {
                    b.finish();
                }
                b.embeddings.push((b.tokens.len(), e));
                b.tokens.extend(std::iter::repeat_n(0, vectors));
                b.weights.extend(std::iter::repeat_n(weight, vectors));
                at += name_len;
                continue;
            }
            b.tokens.push(id);
            b.weights.push(weight);
            at += 1;
        }
    }
    if !b.tokens.is_empty() || b.done.is_empty() {
        b.finish();
    }
    b.done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str, w: f64) -> Piece {
        Piece::Text(s.into(), w)
    }

    fn close(pieces: &[Piece], want: &[Piece]) {
        assert_eq!(pieces.len(), want.len(), "{pieces:?}");
        for (a, b) in pieces.iter().zip(want) {
            match (a, b) {
                (Piece::Text(s, w), Piece::Text(t, v)) => {
                    assert_eq!(s, t);
                    assert!((w - v).abs() < 1e-12, "{pieces:?}");
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    /// The examples of A1111's own docstring for `parse_prompt_attention`.
    #[test]
    fn parses_as_a1111_does() {
        close(&parse("normal text"), &[text("normal text", 1.0)]);
        close(
            &parse("an (important) word"),
            &[text("an ", 1.0), text("important", 1.1), text(" word", 1.0)],
        );
        close(&parse("(unbalanced"), &[text("unbalanced", 1.1)]);
        close(&parse("\\(literal\\]"), &[text("(literal]", 1.0)]);
        close(
            &parse("(unnecessary)(parens)"),
            &[text("unnecessaryparens", 1.1)],
        );
        close(
            &parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                text("a ", 1.0),
                text("house", 1.5730000000000004),
                text(" ", 1.1),
                text("on", 1.0),
                text(" a ", 1.1),
                text("hill", 0.55),
                text(", sun, ", 1.1),
                text("sky", 1.4641000000000006),
                text(".", 1.1),
            ],
        );
        close(&parse("[x]"), &[text("x", 1.0 / 1.1)]);
        close(
            &parse("a BREAK b"),
            &[text("a", 1.0), Piece::Break, text("b", 1.0)],
        );
        close(&parse("BREAKFAST"), &[text("BREAKFAST", 1.0)]);
        close(&parse(""), &[text("", 1.0)]);
        close(&parse("x:1.2) y)"), &[text("x:1.2) y)", 1.0)]);
        // A number Python cannot read (A1111 fails on it): the text stays, the bracket open.
        close(&parse("(x:1.2.3)"), &[text("x:1.2.3)", 1.1)]);
    }

    #[test]
    fn long_prompts_chunk_at_75_tokens_and_back_to_a_comma() {
        let t = ChunkTokens {
            bos: 1,
            eos: 2,
            comma: Some(3),
            per_chunk: CHUNK_TOKENS,
        };
        // 80 tokens of weight 1: two chunks, 75 + 5.
        let tokenize = |s: &str| {
            s.split(' ')
                .filter(|w| !w.is_empty())
                .map(|w| w.parse().unwrap())
                .collect()
        };
        let words = |n: usize, id: u32| vec![id.to_string(); n].join(" ");
        let c = chunks(&parse(&words(80, 9)), tokenize, &t, &[]);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.ids.len() == 77 && c.weights.len() == 77));
        assert_eq!((c[0].ids[0], c[0].ids[75], c[0].ids[76]), (1, 9, 2));
        assert_eq!(&c[1].ids[..7], &[1, 9, 9, 9, 9, 9, 2]);
        // A comma 10 tokens before the end: the 10 tokens after it move to the next chunk.
        let prompt = format!("{} 3 {}", words(64, 9), words(20, 8));
        let c = chunks(&parse(&prompt), tokenize, &t, &[]);
        assert_eq!(c[0].ids[65], 3, "the chunk ends at the comma");
        assert!(c[0].ids[66..].iter().all(|&id| id == 2));
        assert_eq!(&c[1].ids[1..21], &[8; 20]);
        // BREAK pads the chunk; weights follow the brackets.
        let c = chunks(&parse("9 BREAK (8:1.5)"), tokenize, &t, &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0].ids[..3], &[1, 9, 2]);
        assert_eq!((c[1].ids[1], c[1].weights[1]), (8, 1.5));
        assert!(!c[1].is_plain() && c[0].is_plain());
        // An embedding named by ids [7, 7] with 3 vectors: placeholders where its name was,
        // with the piece's weight; the longest name wins.
        let names = [
            EmbeddingName {
                ids: vec![7],
                vectors: 1,
            },
            EmbeddingName {
                ids: vec![7, 7],
                vectors: 3,
            },
        ];
        let c = chunks(&parse("9 (7 7:1.2) 9 7"), tokenize, &t, &names);
        assert_eq!(&c[0].ids[..8], &[1, 9, 0, 0, 0, 9, 0, 2]);
        assert_eq!(c[0].embeddings, vec![(2, 1), (6, 0)]);
        assert_eq!(&c[0].weights[2..5], &[1.2, 1.2, 1.2]);
        // One that does not fit the chunk's end starts the next chunk.
        let c = chunks(
            &parse(&format!("{} 7 7", words(74, 9))),
            tokenize,
            &t,
            &names,
        );
        assert_eq!((c.len(), c[1].embeddings.clone()), (2, vec![(1, 1)]));
    }
}
