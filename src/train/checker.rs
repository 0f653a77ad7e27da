//! The checker: judges an image against its caption, attribute by attribute, so prompt
//! adherence can be pooled per attribute and per group of prompts.
//!
//! One-shape captions judge the largest component; when there is none, every stated
//! attribute of the shape is wrong. Two-shape captions need exactly two components (else
//! every stated shape attribute and the relation are wrong), matched to the named shapes by
//! color and kind; when both matchings fit equally well, the first named shape is the left
//! (for `to the left of`) or upper (for `above`) component. The relation is right when the
//! first named shape's centre is at least 6 px left of (above) the second's. A position
//! phrase is judged on the axes it names. The background, when stated, is always judged.

pub mod analyse;

pub use analyse::{analyse, Analysis, Component};

use crate::error::Result;
use crate::train::shapes::{parse_caption, Cell, PromptSpec, Relation, ShapeSpec};

/// Minimum centre offset, in pixels at 64 x 64, for a relation to be right.
const RELATION_OFFSET: usize = 6;

/// A kind of stated attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    Background,
    Color,
    Kind,
    Size,
    /// The row of a position phrase that names one (`at the top`, corners, `in the center`).
    Row,
    /// The column of a position phrase that names one (`on the left`, corners, `in the center`).
    Column,
    Relation,
}

impl Attribute {
    pub const ALL: [Attribute; 7] = [
        Attribute::Background,
        Attribute::Color,
        Attribute::Kind,
        Attribute::Size,
        Attribute::Row,
        Attribute::Column,
        Attribute::Relation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attribute::Background => "background",
            Attribute::Color => "color",
            Attribute::Kind => "kind",
            Attribute::Size => "size",
            Attribute::Row => "row",
            Attribute::Column => "column",
            Attribute::Relation => "relation",
        }
    }
}

/// The judgement of one stated attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub attribute: Attribute,
    /// The named shape it is about (0: the first named), `None` for the background and the
    /// relation.
    pub shape: Option<usize>,
    /// What the caption states.
    pub stated: String,
    /// What the image shows, or `None` when there was no shape to judge.
    pub seen: Option<String>,
    pub right: bool,
}

/// Every stated attribute of a caption, judged against an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub prompt: PromptSpec,
    pub analysis: Analysis,
    pub verdicts: Vec<Verdict>,
}

impl Judgement {
    /// The number of stated attributes.
    pub fn stated(&self) -> usize {
        self.verdicts.len()
    }

    /// The number of stated attributes judged right.
    pub fn right(&self) -> usize {
        self.verdicts.iter().filter(|v| v.right).count()
    }

    pub fn all_right(&self) -> bool {
        self.verdicts.iter().all(|v| v.right)
    }

    pub fn wrong(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| !v.right)
    }

    /// The verdict on `attribute` of named shape `shape` (`None`: background, relation).
    pub fn verdict(&self, attribute: Attribute, shape: Option<usize>) -> Option<&Verdict> {
        self.verdicts
            .iter()
            .find(|v| v.attribute == attribute && v.shape == shape)
    }
}

/// Judges a row-major RGB image against a caption of the shapes grammar. A caption outside
/// the grammar, or a buffer that is not `width` x `height` RGB, is an error.
pub fn check(caption: &str, rgb: &[u8], width: usize, height: usize) -> Result<Judgement> {
    let prompt = parse_caption(caption)?;
    let analysis = analyse(rgb, width, height)?;
    Ok(judge(&prompt, analysis))
}

/// Judges an analysed image against what a caption states.
pub fn judge(prompt: &PromptSpec, analysis: Analysis) -> Judgement {
    let mut verdicts = Vec::new();
    if let Some(background) = prompt.background() {
        verdicts.push(Verdict {
            attribute: Attribute::Background,
            shape: None,
            stated: background.name().into(),
            seen: Some(analysis.background.name().into()),
            right: analysis.background == background,
        });
    }
    match prompt {
        PromptSpec::One {
            size,
            shape,
            position,
            ..
        } => {
            let found = analysis.components.first();
            verdicts.extend(shape_verdicts(0, shape, found));
            if let Some(size) = size {
                verdicts.push(verdict(
                    Attribute::Size,
                    0,
                    size.name(),
                    found.map(|c| c.size.name().into()),
                ));
            }
            if let Some(cell) = position {
                verdicts.extend(position_verdicts(*cell, found.map(|c| c.cell)));
            }
        }
        PromptSpec::Two {
            first,
            relation,
            second,
            ..
        } => {
            let [a, b] = match analysis.components.as_slice() {
                [c0, c1] => match_two(first, second, *relation, c0, c1),
                _ => [None, None],
            };
            verdicts.extend(shape_verdicts(0, first, a));
            verdicts.extend(shape_verdicts(1, second, b));
            let offset = a.zip(b).map(|(a, b)| centre_offset2(*relation, a, b));
            let side = match relation {
                Relation::LeftOf => analysis.width,
                Relation::Above => analysis.height,
            };
            // offset / 2 >= 6 * side / 64 (6 px at 64 x 64), in integers.
            let needed = (2 * RELATION_OFFSET * side) as i64;
            verdicts.push(Verdict {
                attribute: Attribute::Relation,
                shape: None,
                stated: relation.phrase().into(),
                seen: offset
                    .map(|o| format!("first centre {} px before the second's", o as f64 / 2.0)),
                right: offset.is_some_and(|o| o * analyse::REFERENCE_SIDE as i64 >= needed),
            });
        }
    }
    Judgement {
        prompt: *prompt,
        analysis,
        verdicts,
    }
}

fn verdict(attribute: Attribute, shape: usize, stated: &str, seen: Option<String>) -> Verdict {
    let right = seen.as_deref() == Some(stated);
    Verdict {
        attribute,
        shape: Some(shape),
        stated: stated.into(),
        seen,
        right,
    }
}

fn shape_verdicts(index: usize, named: &ShapeSpec, found: Option<&Component>) -> [Verdict; 2] {
    [
        verdict(
            Attribute::Color,
            index,
            named.color.name(),
            found.map(|c| c.color.name().into()),
        ),
        verdict(
            Attribute::Kind,
            index,
            named.kind.name(),
            found.map(|c| c.kind.name().into()),
        ),
    ]
}

fn position_verdicts(stated: Cell, seen: Option<Cell>) -> Vec<Verdict> {
    const ROWS: [&str; 3] = ["top", "middle", "bottom"];
    const COLUMNS: [&str; 3] = ["left", "middle", "right"];
    let (row, col) = stated.named_axes();
    let mut verdicts = Vec::new();
    if row {
        let seen_row = seen.map(|c| ROWS[c.row as usize].to_string());
        verdicts.push(verdict(
            Attribute::Row,
            0,
            ROWS[stated.row as usize],
            seen_row,
        ));
    }
    if col {
        let seen_col = seen.map(|c| COLUMNS[c.col as usize].to_string());
        verdicts.push(verdict(
            Attribute::Column,
            0,
            COLUMNS[stated.col as usize],
            seen_col,
        ));
    }
    verdicts
}

/// How far, in doubled pixels, `a`'s centre lies before `b`'s along the relation's axis.
fn centre_offset2(relation: Relation, a: &Component, b: &Component) -> i64 {
    let (a, b) = (a.bbox.centre2(), b.bbox.centre2());
    match relation {
        Relation::LeftOf => i64::from(b.0) - i64::from(a.0),
        Relation::Above => i64::from(b.1) - i64::from(a.1),
    }
}

/// Assigns the two components to the named shapes: the assignment with more color and kind
/// matches; on a tie, the first named shape is the component that comes first along the
/// relation's axis (left, or upper).
fn match_two<'a>(
    first: &ShapeSpec,
    second: &ShapeSpec,
    relation: Relation,
    c0: &'a Component,
    c1: &'a Component,
) -> [Option<&'a Component>; 2] {
    let fits = |named: &ShapeSpec, c: &Component| {
        usize::from(named.color == c.color) + usize::from(named.kind == c.kind)
    };
    let straight = fits(first, c0) + fits(second, c1);
    let swapped = fits(first, c1) + fits(second, c0);
    let in_order = match straight.cmp(&swapped) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => centre_offset2(relation, c0, c1) >= 0,
    };
    if in_order {
        [Some(c0), Some(c1)]
    } else {
        [Some(c1), Some(c0)]
    }
}
