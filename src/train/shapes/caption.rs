//! The caption grammar, both ways: [`caption_for`] writes a caption for a [`PromptSpec`],
//! [`parse_caption`] reads one back.
//!
//! ```text
//! one shape:  a|an [SIZE] COLOR SHAPE [POSITION-PHRASE] [BACKGROUND-PHRASE]
//! two shapes: a|an COLOR SHAPE (to the left of|above) a|an COLOR SHAPE [BACKGROUND-PHRASE]
//! POSITION-PHRASE:   in the center | at the top | at the bottom | on the left | on the right
//!                    | in the top left | in the top right | in the bottom left | in the bottom right
//! BACKGROUND-PHRASE: on a|an COLOR background
//! ```

use super::palette::{is_held_out, Cell, Color, Kind, Relation, Size};
use super::prng::SplitMix64;
use super::scene::Scene;
use crate::error::{Error, Result};

/// A named shape: color and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShapeSpec {
    pub color: Color,
    pub kind: Kind,
}

impl ShapeSpec {
    pub fn is_held_out(&self) -> bool {
        is_held_out(self.color, self.kind)
    }
}

/// What a caption states; `None` parts are left out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PromptSpec {
    One {
        size: Option<Size>,
        shape: ShapeSpec,
        position: Option<Cell>,
        background: Option<Color>,
    },
    Two {
        first: ShapeSpec,
        relation: Relation,
        second: ShapeSpec,
        background: Option<Color>,
    },
}

impl PromptSpec {
    /// The spec that states everything the caption grammar can say about `scene`.
    pub fn full(scene: &Scene) -> PromptSpec {
        let spec = |k: usize| ShapeSpec {
            color: scene.shapes[k].color,
            kind: scene.shapes[k].kind,
        };
        match scene.relation {
            Some(relation) => PromptSpec::Two {
                first: spec(0),
                relation,
                second: spec(1),
                background: Some(scene.background),
            },
            None => PromptSpec::One {
                size: Some(scene.shapes[0].size),
                shape: spec(0),
                position: Some(scene.shapes[0].cell),
                background: Some(scene.background),
            },
        }
    }

    /// The training caption's spec for `scene`: each optional part (size, position,
    /// background) kept or dropped independently with probability 1/2, in that order.
    pub fn random_for(scene: &Scene, rng: &mut SplitMix64) -> PromptSpec {
        fn keep<T>(value: Option<T>, rng: &mut SplitMix64) -> Option<T> {
            if rng.coin() {
                value
            } else {
                None
            }
        }
        match PromptSpec::full(scene) {
            PromptSpec::One {
                size,
                shape,
                position,
                background,
            } => PromptSpec::One {
                size: keep(size, rng),
                shape,
                position: keep(position, rng),
                background: keep(background, rng),
            },
            PromptSpec::Two {
                first,
                relation,
                second,
                background,
            } => PromptSpec::Two {
                first,
                relation,
                second,
                background: keep(background, rng),
            },
        }
    }

    /// The named shapes, in caption order.
    pub fn shapes(&self) -> Vec<ShapeSpec> {
        match self {
            PromptSpec::One { shape, .. } => vec![*shape],
            PromptSpec::Two { first, second, .. } => vec![*first, *second],
        }
    }

    pub fn background(&self) -> Option<Color> {
        match self {
            PromptSpec::One { background, .. } | PromptSpec::Two { background, .. } => *background,
        }
    }

    /// Whether any named shape is a held-out combination.
    pub fn is_held_out(&self) -> bool {
        self.shapes().iter().any(ShapeSpec::is_held_out)
    }
}

/// `a` or `an`, agreeing with the word that follows.
pub fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The caption stating exactly what `spec` states.
pub fn caption_for(spec: &PromptSpec) -> String {
    let mut words: Vec<String> = Vec::new();
    let push_article_and = |words: &mut Vec<String>, rest: &[&str]| {
        words.push(article(rest[0]).into());
        words.extend(rest.iter().map(|w| w.to_string()));
    };
    match spec {
        PromptSpec::One {
            size,
            shape,
            position,
            ..
        } => {
            let mut named: Vec<&str> = size.iter().map(|s| s.name()).collect();
            named.extend([shape.color.name(), shape.kind.name()]);
            push_article_and(&mut words, &named);
            if let Some(cell) = position {
                words.push(cell.phrase());
            }
        }
        PromptSpec::Two {
            first,
            relation,
            second,
            ..
        } => {
            push_article_and(&mut words, &[first.color.name(), first.kind.name()]);
            words.push(relation.phrase().into());
            push_article_and(&mut words, &[second.color.name(), second.kind.name()]);
        }
    }
    if let Some(background) = spec.background() {
        words.push("on".into());
        push_article_and(&mut words, &[background.name(), "background"]);
    }
    words.join(" ")
}

/// Reads a caption back into what it states. Case and runs of white space are ignored;
/// anything else outside the grammar (including `a`/`an` not agreeing with the next word)
/// is an error that says where the caption leaves it.
pub fn parse_caption(caption: &str) -> Result<PromptSpec> {
    let lower = caption.to_lowercase();
    let mut words = Words {
        words: lower.split_whitespace().collect(),
        at: 0,
    };
    words.parse().map_err(|why| {
        Error::InvalidRequest(format!(
            "caption {caption:?} is outside the shapes grammar: {why}"
        ))
    })
}

struct Words<'a> {
    words: Vec<&'a str>,
    at: usize,
}

impl<'a> Words<'a> {
    fn peek(&self, ahead: usize) -> Option<&'a str> {
        self.words.get(self.at + ahead).copied()
    }

    fn found(&self) -> String {
        match self.peek(0) {
            Some(w) => format!("found {w:?} (word {})", self.at + 1),
            None => "found the end".into(),
        }
    }

    fn next_as<T>(&mut self, what: &str, read: impl Fn(&'a str) -> Option<T>) -> Result<T, String> {
        match self.peek(0).and_then(read) {
            Some(value) => {
                self.at += 1;
                Ok(value)
            }
            None => Err(format!("expected {what}, {}", self.found())),
        }
    }

    fn expect(&mut self, word: &str) -> Result<(), String> {
        self.next_as(&format!("{word:?}"), |w| (w == word).then_some(()))
    }

    /// `a` or `an`, which must agree with the word after it.
    fn article(&mut self) -> Result<(), String> {
        let word = self.next_as("\"a\" or \"an\"", |w| matches!(w, "a" | "an").then_some(w))?;
        match self.peek(0) {
            Some(next) if article(next) != word => Err(format!(
                "\"{word} {next}\" should be \"{} {next}\"",
                article(next)
            )),
            _ => Ok(()),
        }
    }

    fn color(&mut self) -> Result<Color, String> {
        self.next_as("a color", Color::from_name)
    }

    fn shape(&mut self) -> Result<ShapeSpec, String> {
        let color = self.color()?;
        let kind = self.next_as("a shape (circle, square, triangle)", Kind::from_name)?;
        Ok(ShapeSpec { color, kind })
    }

    fn parse(&mut self) -> Result<PromptSpec, String> {
        self.article()?;
        let size = match self.peek(0).and_then(Size::from_name) {
            Some(size) => {
                self.at += 1;
                Some(size)
            }
            None => None,
        };
        let first = self.shape()?;
        let relation = match (self.peek(0), self.peek(1)) {
            (Some("above"), _) => Some(Relation::Above),
            (Some("to"), _) => Some(Relation::LeftOf),
            _ => None,
        };
        let spec = match relation {
            Some(relation) => {
                if size.is_some() {
                    return Err("a two-shape caption does not state sizes".into());
                }
                for word in relation.phrase().split(' ') {
                    self.expect(word)?;
                }
                self.article()?;
                let second = self.shape()?;
                PromptSpec::Two {
                    first,
                    relation,
                    second,
                    background: self.background()?,
                }
            }
            None => {
                let position = self.position()?;
                PromptSpec::One {
                    size,
                    shape: first,
                    position,
                    background: self.background()?,
                }
            }
        };
        if self.peek(0).is_some() {
            return Err(format!("expected the end, {}", self.found()));
        }
        Ok(spec)
    }

    /// An optional position phrase: `in`/`at`/`on`, `the`, a cell name.
    fn position(&mut self) -> Result<Option<Cell>, String> {
        let preposition = match (self.peek(0), self.peek(1)) {
            (Some(p @ ("in" | "at" | "on")), Some("the")) => p,
            _ => return Ok(None),
        };
        self.at += 2;
        // The longest cell name that the words start with (`top left` before `top`).
        let rest = &self.words[self.at..];
        let found = Cell::ALL
            .into_iter()
            .map(|cell| (cell, cell.name()))
            .filter(|(_, name)| rest.starts_with(&name.split(' ').collect::<Vec<_>>()))
            .max_by_key(|(_, name)| name.len());
        if let Some((cell, name)) = found {
            if cell.phrase() != format!("{preposition} the {name}") {
                return Err(format!(
                    "the position phrase is \"{}\", not \"{preposition} the {name}\"",
                    cell.phrase()
                ));
            }
            self.at += name.split(' ').count();
            return Ok(Some(cell));
        }
        Err(format!(
            "expected a position (center, top, bottom, left, right, top left, ...), {}",
            self.found()
        ))
    }

    /// An optional `on a|an COLOR background`.
    fn background(&mut self) -> Result<Option<Color>, String> {
        if self.peek(0) != Some("on") {
            return Ok(None);
        }
        self.at += 1;
        self.article()?;
        let color = self.color()?;
        self.expect("background")?;
        Ok(Some(color))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(
        size: Option<Size>,
        color: Color,
        kind: Kind,
        position: Option<Cell>,
        background: Option<Color>,
    ) -> PromptSpec {
        PromptSpec::One {
            size,
            shape: ShapeSpec { color, kind },
            position,
            background,
        }
    }

    #[test]
    fn writes_captions() {
        let spec = one(
            Some(Size::Large),
            Color::Orange,
            Kind::Circle,
            Some(Cell { row: 0, col: 0 }),
            Some(Color::Orange),
        );
        assert_eq!(
            caption_for(&spec),
            "a large orange circle in the top left on an orange background"
        );
        let spec = one(
            None,
            Color::Orange,
            Kind::Triangle,
            Some(Cell { row: 1, col: 2 }),
            None,
        );
        assert_eq!(caption_for(&spec), "an orange triangle on the right");
        let spec = PromptSpec::Two {
            first: ShapeSpec {
                color: Color::Red,
                kind: Kind::Square,
            },
            relation: Relation::LeftOf,
            second: ShapeSpec {
                color: Color::Orange,
                kind: Kind::Circle,
            },
            background: Some(Color::Black),
        };
        assert_eq!(
            caption_for(&spec),
            "a red square to the left of an orange circle on a black background"
        );
    }

    #[test]
    fn reads_back_every_one_shape_form() {
        for size in [None, Some(Size::Small), Some(Size::Large)] {
            for position in std::iter::once(None).chain(Cell::ALL.map(Some)) {
                for background in [None, Some(Color::Orange), Some(Color::Blue)] {
                    for color in Color::ALL {
                        for kind in Kind::ALL {
                            let spec = one(size, color, kind, position, background);
                            assert_eq!(parse_caption(&caption_for(&spec)).unwrap(), spec);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn reads_back_two_shape_forms() {
        for relation in Relation::ALL {
            for background in [None, Some(Color::White)] {
                let spec = PromptSpec::Two {
                    first: ShapeSpec {
                        color: Color::Orange,
                        kind: Kind::Triangle,
                    },
                    relation,
                    second: ShapeSpec {
                        color: Color::Green,
                        kind: Kind::Square,
                    },
                    background,
                };
                assert_eq!(parse_caption(&caption_for(&spec)).unwrap(), spec);
            }
        }
        assert!(parse_caption("A Red  Circle above a red circle").is_ok());
    }

    #[test]
    fn rejects_captions_outside_the_grammar() {
        for bad in [
            "",
            "red circle",
            "a orange circle",
            "an red circle",
            "a big red circle",
            "a red hexagon",
            "a red circle at the left",
            "a red circle in the middle",
            "a red circle on a blue",
            "a red circle on a blue background please",
            "a small red circle above a blue square",
            "a red circle to the right of a blue square",
            "a red circle on a blue background in the center",
        ] {
            let err = parse_caption(bad).expect_err(bad).to_string();
            assert!(err.contains("outside the shapes grammar"), "{bad}: {err}");
        }
    }
}
