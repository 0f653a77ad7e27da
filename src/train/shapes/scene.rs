//! What an image shows (background, shapes, relation) and how the generator draws it at
//! random under the data set's rules.

use super::draw::{shape_height, BBox, IMAGE_SIZE};
use super::palette::{is_held_out, Cell, Color, Kind, Relation, Size};
use super::prng::SplitMix64;

/// Minimum distance, in pixels, from a shape's centre to its cell's borders.
const CENTRE_MARGIN: u32 = 2;
/// Minimum number of empty pixels between a shape and the canvas edge.
const CANVAS_MARGIN: u32 = 1;
/// Minimum number of empty pixels between the boxes of the two shapes of an image.
const MIN_GAP: u32 = 4;
/// Minimum centre offset, in pixels, along the relation's axis.
const MIN_OFFSET: u32 = 12;

/// One drawn shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub kind: Kind,
    pub color: Color,
    pub size: Size,
    /// The exact box of its pixels.
    pub bbox: BBox,
    /// The grid cell of its centre.
    pub cell: Cell,
}

/// Everything an image shows. In two-shape scenes `shapes[0]` is the first named shape:
/// the left one for [`Relation::LeftOf`], the upper one for [`Relation::Above`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scene {
    pub background: Color,
    pub shapes: Vec<Shape>,
    /// Set exactly when there are two shapes.
    pub relation: Option<Relation>,
}

impl Scene {
    /// Draws a scene: one image in three has two shapes.
    pub fn random(rng: &mut SplitMix64) -> Scene {
        if rng.below(3) == 0 {
            Self::random_two(rng)
        } else {
            Self::random_one(rng)
        }
    }

    fn random_one(rng: &mut SplitMix64) -> Scene {
        let background = rng.pick(&Color::ALL);
        let (kind, color) = random_look(rng, background);
        let size = rng.pick(&Size::ALL);
        let width = random_width(rng, size);
        let cell = rng.pick(&Cell::ALL);
        let bbox = random_box_in(rng, cell, width, shape_height(kind, width));
        Scene {
            background,
            shapes: vec![Shape {
                kind,
                color,
                size,
                bbox,
                cell,
            }],
            relation: None,
        }
    }

    fn random_two(rng: &mut SplitMix64) -> Scene {
        let background = rng.pick(&Color::ALL);
        let relation = rng.pick(&Relation::ALL);
        let looks = [random_look(rng, background), random_look(rng, background)];
        let widths = [
            random_width(rng, Size::Small),
            random_width(rng, Size::Small),
        ];
        // Rejection sampling: place both shapes as a one-shape image would, keep the first
        // placement that meets the relation and the spacing rules.
        loop {
            let shapes: Vec<Shape> = (0..2)
                .map(|k| {
                    let (kind, color) = looks[k];
                    let cell = rng.pick(&Cell::ALL);
                    let bbox = random_box_in(rng, cell, widths[k], shape_height(kind, widths[k]));
                    Shape {
                        kind,
                        color,
                        size: Size::Small,
                        bbox,
                        cell,
                    }
                })
                .collect();
            if shapes[0].bbox.gap(&shapes[1].bbox) >= MIN_GAP
                && satisfies(relation, &shapes[0].bbox, &shapes[1].bbox)
            {
                return Scene {
                    background,
                    shapes,
                    relation: Some(relation),
                };
            }
        }
    }
}

/// Whether `first` is placed `relation` `second` as the generator requires: its centre at
/// least 12 px before the other's on the relation's axis, and the offset on the other axis
/// at most half of that.
pub fn satisfies(relation: Relation, first: &BBox, second: &BBox) -> bool {
    let (a, b) = (first.centre2(), second.centre2());
    // Doubled offsets: main axis, cross axis.
    let (main, cross) = match relation {
        Relation::LeftOf => (b.0 as i64 - a.0 as i64, b.1 as i64 - a.1 as i64),
        Relation::Above => (b.1 as i64 - a.1 as i64, b.0 as i64 - a.0 as i64),
    };
    main >= 2 * i64::from(MIN_OFFSET) && 2 * cross.abs() <= main
}

/// A kind, uniform, then a color, uniform among those that differ from the background and
/// do not make a held-out combination with the kind.
fn random_look(rng: &mut SplitMix64, background: Color) -> (Kind, Color) {
    let kind = rng.pick(&Kind::ALL);
    let colors: Vec<Color> = Color::ALL
        .into_iter()
        .filter(|&c| c != background && !is_held_out(c, kind))
        .collect();
    (kind, rng.pick(&colors))
}

fn random_width(rng: &mut SplitMix64, size: Size) -> u32 {
    let (lo, hi) = size.widths();
    rng.between(lo, hi)
}

/// A uniformly chosen box of `width` x `height` whose centre lies in `cell`, at least 2 px
/// inside the cell's borders, with the shape at least 1 px inside the canvas.
fn random_box_in(rng: &mut SplitMix64, cell: Cell, width: u32, height: u32) -> BBox {
    let x = rng.pick(&starts(cell.col, width));
    let y = rng.pick(&starts(cell.row, height));
    BBox::at(x, y, width, height)
}

/// The first pixels, along one axis, that put a shape of `extent` pixels in grid band `band`.
fn starts(band: u8, extent: u32) -> Vec<u32> {
    let n = IMAGE_SIZE;
    let band = u32::from(band);
    let valid: Vec<u32> = (CANVAS_MARGIN..=n - CANVAS_MARGIN - extent)
        .filter(|&s| {
            // The doubled centre c2 = 2s + extent must satisfy, with the band's borders at
            // band * n / 3 and (band + 1) * n / 3:
            // band * n / 3 + margin <= c2 / 2 <= (band + 1) * n / 3 - margin.
            let c2_times_3 = 3 * (2 * s + extent);
            c2_times_3 >= 2 * band * n + 6 * CENTRE_MARGIN
                && c2_times_3 <= 2 * (band + 1) * n - 6 * CENTRE_MARGIN
        })
        .collect();
    assert!(
        !valid.is_empty(),
        "no place for a {extent}-px shape in band {band}"
    );
    valid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_extent_fits_every_band() {
        for extent in (10..=18).chain(22..=34) {
            for band in 0..3 {
                for s in starts(band, extent) {
                    let b = BBox::at(s, s, extent, extent);
                    assert_eq!(
                        Cell::of_centre2(b.centre2().0, 0, IMAGE_SIZE, IMAGE_SIZE).col,
                        band
                    );
                    assert!(b.xmin >= 1 && b.xmax <= IMAGE_SIZE - 2);
                    let c = b.centre().0;
                    let lo = f32::from(band) * 64.0 / 3.0;
                    assert!(
                        c >= lo + 2.0 && c <= lo + 64.0 / 3.0 - 2.0,
                        "centre {c} in band {band}"
                    );
                }
            }
        }
    }

    #[test]
    fn relations() {
        let a = BBox::at(10, 10, 12, 12); // centre (16, 16)
        assert!(satisfies(Relation::LeftOf, &a, &BBox::at(22, 16, 12, 12))); // (28, 22)
        assert!(!satisfies(Relation::LeftOf, &a, &BBox::at(22, 17, 12, 12))); // dy 7 > 6
        assert!(!satisfies(Relation::LeftOf, &a, &BBox::at(21, 10, 12, 12))); // dx 11
        assert!(satisfies(Relation::Above, &a, &BBox::at(10, 22, 12, 12)));
        assert!(!satisfies(Relation::Above, &BBox::at(10, 22, 12, 12), &a));
    }
}
