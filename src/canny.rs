//! Canny edge maps, as OpenCV's `cv2.Canny(rgb, low, high)` computes them (the control
//! images of ControlNet's canny models): 3x3 Sobel derivatives with replicated borders,
//! on a colour picture the channel with the largest gradient at each pixel, the L1
//! magnitude |dx| + |dy|, non-maximum suppression along the gradient's direction (OpenCV's
//! fixed-point sectors), and hysteresis: a pixel above `high` is an edge, and so is one above
//! `low` connected to an edge through its 8 neighbours.

use image::{GrayImage, Luma, RgbImage};

/// tan(22.5°) in OpenCV's 15-bit fixed point.
const TG22: i64 = 13573;
const SHIFT: u32 = 15;

/// The edge map (255 on edges, 0 elsewhere). Thresholds are floored, as OpenCV does; the
/// lower is swapped in if `low > high`.
pub fn canny(rgb: &RgbImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    if w == 0 || h == 0 {
        return GrayImage::new(rgb.width(), rgb.height());
    }
    // Sobel derivatives per channel, the channel of largest L1 magnitude kept (the first on
    // a tie).
    let px = |x: isize, y: isize, c: usize| -> i64 {
        let x = x.clamp(0, w as isize - 1) as u32;
        let y = y.clamp(0, h as isize - 1) as u32;
        i64::from(rgb.get_pixel(x, y).0[c])
    };
    let mut dx = vec![0i64; w * h];
    let mut dy = vec![0i64; w * h];
    let mut mag = vec![0i64; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let mut best = -1;
            for c in 0..3 {
                let gx = (px(x + 1, y - 1, c) + 2 * px(x + 1, y, c) + px(x + 1, y + 1, c))
                    - (px(x - 1, y - 1, c) + 2 * px(x - 1, y, c) + px(x - 1, y + 1, c));
                let gy = (px(x - 1, y + 1, c) + 2 * px(x, y + 1, c) + px(x + 1, y + 1, c))
                    - (px(x - 1, y - 1, c) + 2 * px(x, y - 1, c) + px(x + 1, y - 1, c));
                let m = gx.abs() + gy.abs();
                if m > best {
                    best = m;
                    dx[i] = gx;
                    dy[i] = gy;
                }
            }
            mag[i] = best;
        }
    }
    // Outside the picture the magnitude is 0.
    let m_at = |x: isize, y: isize| -> i64 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 0: maybe an edge (above `low`, a local maximum), 2: an edge, 1: not an edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[i], dy[i]);
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let maximum = if ay < tg22x {
                m > m_at(x - 1, y) && m >= m_at(x + 1, y)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > m_at(x, y - 1) && m >= m_at(x, y + 1)
                } else {
                    let s = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > m_at(x - s, y - 1) && m > m_at(x + s, y + 1)
                }
            };
            if !maximum {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push((x, y));
            } else {
                map[i] = 0;
            }
        }
    }
    while let Some((x, y)) = stack.pop() {
        for (ox, oy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push((nx, ny));
            }
        }
    }
    GrayImage::from_fn(w as u32, h as u32, |x, y| {
        Luma([if map[y as usize * w + x as usize] == 2 {
            255
        } else {
            0
        }])
    })
}

/// The edge map as a three-channel picture (what a ControlNet reads).
pub fn canny_rgb(rgb: &RgbImage, low: f64, high: f64) -> RgbImage {
    let edges = canny(rgb, low, high);
    RgbImage::from_fn(edges.width(), edges.height(), |x, y| {
        let v = edges.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}
