//! Geometry and rasterisation: bounding boxes, the pixel masks of the three kinds, and the
//! rendering of a scene to RGB bytes.
//!
//! Edges are hard (no anti-aliasing): a pixel belongs to a shape when its centre is inside
//! it, with the integer rules below, which fill every row and column of the shape's box, so
//! the drawn bounding box is exactly the box the generator chose.

use super::palette::Kind;
use super::scene::Scene;

/// Side of the square canvas, in pixels.
pub const IMAGE_SIZE: u32 = 64;

/// A box of whole pixels, bounds inclusive: it covers `xmin..=xmax` by `ymin..=ymax`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BBox {
    pub xmin: u32,
    pub ymin: u32,
    pub xmax: u32,
    pub ymax: u32,
}

impl BBox {
    /// The box of a `width` x `height` shape whose top-left pixel is (`x`, `y`).
    pub fn at(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            xmin: x,
            ymin: y,
            xmax: x + width - 1,
            ymax: y + height - 1,
        }
    }

    pub fn width(&self) -> u32 {
        self.xmax - self.xmin + 1
    }

    pub fn height(&self) -> u32 {
        self.ymax - self.ymin + 1
    }

    /// The centre in doubled coordinates, exact in integers: (`xmin + xmax + 1`, likewise y).
    pub fn centre2(&self) -> (u32, u32) {
        (self.xmin + self.xmax + 1, self.ymin + self.ymax + 1)
    }

    /// The centre, ((xmin + xmax + 1) / 2, (ymin + ymax + 1) / 2).
    pub fn centre(&self) -> (f32, f32) {
        let (x2, y2) = self.centre2();
        (x2 as f32 / 2.0, y2 as f32 / 2.0)
    }

    /// The number of empty pixel columns or rows between two boxes along the axis where they
    /// are farther apart (0 when the boxes overlap or touch on both axes).
    pub fn gap(&self, other: &BBox) -> u32 {
        let axis = |a0: u32, a1: u32, b0: u32, b1: u32| {
            let (a0, a1, b0, b1) = (a0 as i64, a1 as i64, b0 as i64, b1 as i64);
            (b0 - a1 - 1).max(a0 - b1 - 1).max(0) as u32
        };
        axis(self.xmin, self.xmax, other.xmin, other.xmax)
            .max(axis(self.ymin, self.ymax, other.ymin, other.ymax))
    }
}

/// The height of a shape of `kind` and `width`: the width, or for the equilateral triangle
/// the width times sqrt(3)/2 rounded to the nearest pixel.
pub fn shape_height(kind: Kind, width: u32) -> u32 {
    match kind {
        Kind::Circle | Kind::Square => width,
        // sqrt(3)/2 = 0.8660254...; (w * 17320508 / 20000000) rounded, in integers.
        Kind::Triangle => ((u64::from(width) * 17_320_508 + 10_000_000) / 20_000_000) as u32,
    }
}

/// Whether pixel (`i`, `j`) of a `w` x `h` box (local coordinates, y down) is inside the shape.
pub fn covers(kind: Kind, w: u32, h: u32, i: u32, j: u32) -> bool {
    let (w, h, i, j) = (i64::from(w), i64::from(h), i64::from(i), i64::from(j));
    // Twice the offsets of the pixel centre from the box centre.
    let dx2 = 2 * i + 1 - w;
    let dy2 = 2 * j + 1 - h;
    match kind {
        Kind::Square => true,
        // Centre inside the inscribed ellipse (a circle when w == h).
        Kind::Circle => dx2 * dx2 * h * h + dy2 * dy2 * w * w <= w * w * h * h,
        // Row j spans the triangle's width at the row's lower edge, (j + 1) / h of the base:
        // |centre_x - w/2| <= (j + 1) * w / (2h). The apex row keeps one or two pixels.
        Kind::Triangle => dx2.abs() * h <= (j + 1) * w,
    }
}

/// Draws a scene: the background, then each shape in its box.
pub fn render(scene: &Scene) -> Vec<u8> {
    let size = IMAGE_SIZE as usize;
    let mut rgb = scene.background.rgb().repeat(size * size);
    for shape in &scene.shapes {
        let b = shape.bbox;
        let (w, h) = (b.width(), b.height());
        let color = shape.color.rgb();
        for j in 0..h {
            for i in 0..w {
                let (x, y) = ((b.xmin + i) as usize, (b.ymin + j) as usize);
                if x < size && y < size && covers(shape.kind, w, h, i, j) {
                    let at = (y * size + x) * 3;
                    rgb[at..at + 3].copy_from_slice(&color);
                }
            }
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_stats(kind: Kind, w: u32) -> (f64, bool) {
        let h = shape_height(kind, w);
        let mut filled = 0;
        let mut rows = vec![false; h as usize];
        let mut cols = vec![false; w as usize];
        for j in 0..h {
            for i in 0..w {
                if covers(kind, w, h, i, j) {
                    filled += 1;
                    rows[j as usize] = true;
                    cols[i as usize] = true;
                }
            }
        }
        let full = rows.iter().all(|&r| r) && cols.iter().all(|&c| c);
        (f64::from(filled) / f64::from(w * h), full)
    }

    #[test]
    fn masks_fill_their_box_and_classify_by_fill() {
        for w in (12..=18).chain(26..=34) {
            let (square, full_s) = mask_stats(Kind::Square, w);
            let (circle, full_c) = mask_stats(Kind::Circle, w);
            let (triangle, full_t) = mask_stats(Kind::Triangle, w);
            assert!(
                full_s && full_c && full_t,
                "width {w}: a mask leaves a row or column empty"
            );
            assert!(square >= 0.89, "width {w}: square fill {square}");
            assert!(
                (0.70..0.84).contains(&circle),
                "width {w}: circle fill {circle}"
            );
            assert!(triangle < 0.60, "width {w}: triangle fill {triangle}");
        }
    }

    #[test]
    fn triangle_heights() {
        assert_eq!(shape_height(Kind::Triangle, 12), 10); // 10.39
        assert_eq!(shape_height(Kind::Triangle, 15), 13); // 12.99
        assert_eq!(shape_height(Kind::Triangle, 34), 29); // 29.44
    }

    #[test]
    fn triangle_is_symmetric() {
        for w in 12..=34 {
            let h = shape_height(Kind::Triangle, w);
            for j in 0..h {
                for i in 0..w {
                    assert_eq!(
                        covers(Kind::Triangle, w, h, i, j),
                        covers(Kind::Triangle, w, h, w - 1 - i, j)
                    );
                }
            }
        }
    }

    #[test]
    fn gaps() {
        let a = BBox::at(10, 10, 5, 5); // 10..=14
        assert_eq!(a.gap(&BBox::at(19, 10, 5, 5)), 4);
        assert_eq!(a.gap(&BBox::at(15, 30, 5, 5)), 15);
        assert_eq!(a.gap(&BBox::at(12, 12, 5, 5)), 0);
        assert_eq!(a.centre2(), (25, 25));
    }
}
