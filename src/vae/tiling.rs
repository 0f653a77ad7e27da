//! diffusers' `enable_tiling()` for the KL autoencoder: the input cut into overlapping tiles,
//! each run alone (so memory stays that of one tile whatever the picture's size), then each
//! tile blended linearly into the one above and the one to its left and cropped. The result
//! is diffusers' tiled output, which differs from the untiled one near the seams.
//!
//! Tiles are `sample_size` pixels (`sample_size / factor` latents); they start every 3/4 of
//! a tile; the blend spans 1/4 of a tile on the output side.

use candle_core::Tensor;

use crate::error::Result;

/// The tile geometry on the input and output sides.
pub struct Tiles {
    /// The input tile's side.
    pub tile: usize,
    /// Input tiles start every `stride`.
    pub stride: usize,
    /// Output rows/columns blended into the previous tile.
    pub blend: usize,
    /// Each output tile keeps this many rows/columns.
    pub keep: usize,
}

impl Tiles {
    /// The geometry for an input tile of `tile_in` that gives an output tile of `tile_out`
    /// (overlap factor 0.25, as diffusers).
    pub fn new(tile_in: usize, tile_out: usize) -> Self {
        let blend = (tile_out as f64 * 0.25) as usize;
        Self {
            tile: tile_in,
            stride: ((tile_in as f64 * 0.75) as usize).max(1),
            blend,
            keep: tile_out - blend,
        }
    }
}

/// Runs `run` on each tile of `x` (n, c, h, w) and joins the outputs.
pub fn tiled(x: &Tensor, t: &Tiles, run: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(t.stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(t.stride) {
            let tile = x
                .narrow(2, i, t.tile.min(h - i))?
                .narrow(3, j, t.tile.min(w - j))?
                .contiguous()?;
            row.push(run(&tile)?);
        }
        rows.push(row);
    }
    // In order, each tile blended into the already blended tiles above and to its left.
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend(&rows[i - 1][j], &tile, t.blend, 2)?;
            }
            if j > 0 {
                tile = blend(&rows[i][j - 1], &tile, t.blend, 3)?;
            }
            rows[i][j] = tile;
        }
    }
    let mut joined_rows = Vec::with_capacity(rows.len());
    for row in &rows {
        let cropped = row
            .iter()
            .map(|tile| crop(tile, t.keep))
            .collect::<Result<Vec<_>>>()?;
        joined_rows.push(Tensor::cat(&cropped, 3)?);
    }
    Ok(Tensor::cat(&joined_rows, 2)?)
}

/// The first `keep` rows and columns of a tile (fewer at the edges).
fn crop(tile: &Tensor, keep: usize) -> Result<Tensor> {
    let (_, _, h, w) = tile.dims4()?;
    Ok(tile.narrow(2, 0, keep.min(h))?.narrow(3, 0, keep.min(w))?)
}

/// diffusers' `blend_v` (axis 2) / `blend_h` (axis 3): the first `extent` rows of `b` fade
/// from `a`'s last rows to `b`'s own, weight k / extent for row k.
fn blend(a: &Tensor, b: &Tensor, extent: usize, axis: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(axis)?).min(b.dim(axis)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let a_end = a.narrow(axis, a.dim(axis)? - extent, extent)?;
    let b_start = b.narrow(axis, 0, extent)?;
    // The weights as torch takes them: computed in double, multiplied in float32.
    let own: Vec<f32> = (0..extent)
        .map(|k| (k as f64 / extent as f64) as f32)
        .collect();
    let other: Vec<f32> = (0..extent)
        .map(|k| (1.0 - k as f64 / extent as f64) as f32)
        .collect();
    let shape: Vec<usize> = (0..4).map(|d| if d == axis { extent } else { 1 }).collect();
    let own = Tensor::from_vec(own, shape.as_slice(), b.device())?;
    let other = Tensor::from_vec(other, shape.as_slice(), b.device())?;
    let blended = (a_end.broadcast_mul(&other)? + b_start.broadcast_mul(&own)?)?;
    let rest = b.narrow(axis, extent, b.dim(axis)? - extent)?;
    Ok(Tensor::cat(&[&blended, &rest], axis)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_identity_run_gives_back_the_input_away_from_the_seams() {
        // With run = identity and tile_in == tile_out, the blend mixes a pixel with itself:
        // the whole input comes back.
        let x = Tensor::randn(0f32, 1.0, (1, 2, 21, 30), &Device::Cpu).unwrap();
        let t = Tiles::new(8, 8);
        let y = tiled(&x, &t, &|tile| Ok(tile.clone())).unwrap();
        assert_eq!(y.dims(), x.dims());
        let diff = (y - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn tiles_start_every_three_quarters_and_blend_a_quarter() {
        let t = Tiles::new(64, 512);
        assert_eq!((t.tile, t.stride, t.blend, t.keep), (64, 48, 128, 384));
    }
}
