//! Image analysis for the checker: the background color, and the shapes as connected
//! components of foreground pixels with their color, kind, size and grid cell.
//!
//! The thresholds are the spec's for 64 x 64 images; for other sizes the pixel thresholds
//! (component area, small/large width) scale with the image.

use crate::error::{Error, Result};
use crate::train::shapes::{BBox, Cell, Color, Kind, Size};

/// Width of the border ring whose median color is the background.
const RING: usize = 2;
/// A pixel is foreground when its Euclidean RGB distance to the background exceeds this.
const FOREGROUND_DISTANCE: f64 = 35.0;
/// Components smaller than this (pixels, at 64 x 64) are noise, not shapes.
const MIN_PIXELS: usize = 20;
/// Shapes narrower than this (pixels, at 64 x 64) are small.
const SMALL_BELOW: usize = 22;
/// Fill fractions of the bounding box: at least `SQUARE_FILL` is a square, at least
/// `CIRCLE_FILL` a circle, less a triangle.
const SQUARE_FILL: f64 = 0.89;
const CIRCLE_FILL: f64 = 0.64;
/// The side the thresholds above are given for.
pub(crate) const REFERENCE_SIDE: usize = 64;

/// One shape found in an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    pub pixels: usize,
    pub bbox: BBox,
    /// Mean RGB of its pixels.
    pub mean: [f64; 3],
    pub color: Color,
    /// Fraction of its bounding box that it fills.
    pub fill: f64,
    pub kind: Kind,
    pub size: Size,
    pub cell: Cell,
}

/// What an image shows, as the checker sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub width: usize,
    pub height: usize,
    /// Per-channel median of the outer 2-px ring.
    pub border_median: [u8; 3],
    pub background: Color,
    /// Components of at least 20 pixels, largest first (ties in raster order of their
    /// first pixel).
    pub components: Vec<Component>,
}

fn to_f64(rgb: [u8; 3]) -> [f64; 3] {
    rgb.map(f64::from)
}

fn distance2(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum()
}

/// Analyses a row-major RGB image (3 bytes a pixel).
pub fn analyse(rgb: &[u8], width: usize, height: usize) -> Result<Analysis> {
    if width < 2 * RING + 1 || height < 2 * RING + 1 || rgb.len() != width * height * 3 {
        return Err(Error::InvalidRequest(format!(
            "cannot check an image of {} bytes as {width} x {height} RGB (at least 5 x 5)",
            rgb.len()
        )));
    }
    let pixel = |x: usize, y: usize| {
        let at = (y * width + x) * 3;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    };

    let border_median = border_median(width, height, &pixel);
    let background = Color::nearest(to_f64(border_median));
    let bg = to_f64(border_median);
    let foreground: Vec<bool> = (0..width * height)
        .map(|i| distance2(to_f64(pixel(i % width, i / width)), bg) > FOREGROUND_DISTANCE.powi(2))
        .collect();

    let min_pixels = (MIN_PIXELS * width * height).div_ceil(REFERENCE_SIDE * REFERENCE_SIDE);
    let mut components: Vec<Component> = connected_components(&foreground, width, height)
        .into_iter()
        .filter(|c| c.len() >= min_pixels)
        .map(|c| describe(&c, width, height, &pixel))
        .collect();
    components.sort_by_key(|c| std::cmp::Reverse(c.pixels)); // stable: ties keep raster order
    Ok(Analysis {
        width,
        height,
        border_median,
        background,
        components,
    })
}

fn border_median(width: usize, height: usize, pixel: &impl Fn(usize, usize) -> [u8; 3]) -> [u8; 3] {
    let mut channels: [Vec<u8>; 3] = Default::default();
    for y in 0..height {
        for x in 0..width {
            let in_ring = x < RING || y < RING || x >= width - RING || y >= height - RING;
            if in_ring {
                let p = pixel(x, y);
                for k in 0..3 {
                    channels[k].push(p[k]);
                }
            }
        }
    }
    // The ring has an even number of pixels; take the mean of the two middle values, rounded.
    channels.map(|mut c| {
        c.sort_unstable();
        let n = c.len();
        (u16::from(c[(n - 1) / 2]) + u16::from(c[n / 2])).div_ceil(2) as u8
    })
}

/// 4-connected components of the set pixels, each a list of pixel indices, in raster order
/// of their first pixel.
fn connected_components(set: &[bool], width: usize, height: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; set.len()];
    let mut components = Vec::new();
    for start in 0..set.len() {
        if !set[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then(|| i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then(|| i + width),
            ];
            for n in neighbours.into_iter().flatten() {
                if set[n] && !seen[n] {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        components.push(members);
    }
    components
}

fn describe(
    members: &[usize],
    width: usize,
    height: usize,
    pixel: &impl Fn(usize, usize) -> [u8; 3],
) -> Component {
    let mut bbox = BBox {
        xmin: u32::MAX,
        ymin: u32::MAX,
        xmax: 0,
        ymax: 0,
    };
    let mut sum = [0f64; 3];
    for &i in members {
        let (x, y) = (i % width, i / width);
        bbox.xmin = bbox.xmin.min(x as u32);
        bbox.xmax = bbox.xmax.max(x as u32);
        bbox.ymin = bbox.ymin.min(y as u32);
        bbox.ymax = bbox.ymax.max(y as u32);
        let p = pixel(x, y);
        for k in 0..3 {
            sum[k] += f64::from(p[k]);
        }
    }
    let pixels = members.len();
    let mean = sum.map(|s| s / pixels as f64);
    let fill = pixels as f64 / f64::from(bbox.width() * bbox.height());
    let kind = if fill >= SQUARE_FILL {
        Kind::Square
    } else if fill >= CIRCLE_FILL {
        Kind::Circle
    } else {
        Kind::Triangle
    };
    // width < 22 * width / 64, in integers.
    let size = if bbox.width() as usize * REFERENCE_SIDE < SMALL_BELOW * width {
        Size::Small
    } else {
        Size::Large
    };
    let (cx2, cy2) = bbox.centre2();
    Component {
        pixels,
        bbox,
        mean,
        color: Color::nearest(mean),
        fill,
        kind,
        size,
        cell: Cell::of_centre2(cx2, cy2, width as u32, height as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_components_and_ignores_specks() {
        let (w, h) = (64, 64);
        let mut rgb = Color::Blue.rgb().repeat(w * h);
        let mut paint = |x0: usize, y0: usize, side: usize, c: Color| {
            for y in y0..y0 + side {
                for x in x0..x0 + side {
                    rgb[(y * w + x) * 3..][..3].copy_from_slice(&c.rgb());
                }
            }
        };
        paint(5, 5, 14, Color::Yellow); // a small square
        paint(10, 50, 4, Color::Red); // 16 px: a speck
        paint(30, 10, 30, Color::White); // a large square
        let a = analyse(&rgb, w, h).unwrap();
        assert_eq!(a.background, Color::Blue);
        assert_eq!(a.components.len(), 2);
        let (big, small) = (&a.components[0], &a.components[1]);
        assert_eq!(
            (big.color, big.kind, big.size),
            (Color::White, Kind::Square, Size::Large)
        );
        assert_eq!(
            (small.color, small.kind, small.size),
            (Color::Yellow, Kind::Square, Size::Small)
        );
        assert_eq!(small.cell, Cell { row: 0, col: 0 });
        assert_eq!(big.cell, Cell { row: 1, col: 2 }); // centre (45, 25)
    }

    #[test]
    fn rejects_wrong_buffer_sizes() {
        assert!(analyse(&[0; 10], 64, 64).is_err());
    }
}
