//! Matrix transpose in cache-sized blocks, spread over the threads: Linear layers keep their
//! weights as (in, out) so every forward pass is a plain row-major product. candle's strided
//! copy walks the source element by element with index arithmetic, which took a third of
//! loading SD 1.5's U-Net (1.9 of 5.5 s).

use candle_core::{CpuStorage, Result, Storage, Tensor};

use super::parallel::for_each_chunk;

/// Output rows per task: a task reads BLOCK consecutive source columns of every source row
/// (64 bytes of f32, a cache line when aligned) and fills BLOCK output rows, which stay in
/// cache while it does.
const BLOCK: usize = 16;

/// `src` (rows x cols, row-major) transposed: cols x rows.
pub fn transpose<T: Copy + Default + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: {rows} x {cols} from {}",
        src.len()
    );
    let mut out = vec![T::default(); src.len()];
    if rows == 0 || cols == 0 {
        return out;
    }
    for_each_chunk(&mut out, BLOCK * rows, |blk, dst| {
        let c0 = blk * BLOCK;
        let width = dst.len() / rows;
        for r in 0..rows {
            let row = &src[r * cols + c0..r * cols + c0 + width];
            for (j, &v) in row.iter().enumerate() {
                dst[j * rows + r] = v;
            }
        }
    });
    out
}

/// A 2-D tensor's transpose as a new contiguous tensor (f32, f16 or bf16 on the CPU by
/// blocks; anything else by candle's copy).
pub fn transpose_matrix(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        drop(storage);
        return w.t()?.contiguous();
    };
    let shape = (cols, rows);
    let device = w.device();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            Tensor::from_vec(transpose(&v[start..end], rows, cols), shape, device)
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            Tensor::from_vec(transpose(&v[start..end], rows, cols), shape, device)
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            Tensor::from_vec(transpose(&v[start..end], rows, cols), shape, device)
        }
        _ => {
            drop(storage);
            w.t()?.contiguous()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Odd sizes (partial blocks both ways), a single row and column, and each dtype, against
    /// candle's own transpose.
    #[test]
    fn matches_candles_transpose() {
        for (rows, cols) in [(37, 53), (16, 16), (1, 29), (29, 1), (70, 33)] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ours = transpose_matrix(&w).unwrap();
                let theirs = w.t().unwrap().contiguous().unwrap();
                assert_eq!(ours.dims(), &[cols, rows]);
                let flat = |t: &Tensor| -> Vec<f32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                assert_eq!(flat(&ours), flat(&theirs), "{rows} x {cols} {dtype:?}");
            }
        }
        // A narrowed (offset) matrix, and a strided view (candle's copy).
        let big = Tensor::randn(0f32, 1.0, (10, 12), &Device::Cpu).unwrap();
        let rows = big.narrow(0, 3, 5).unwrap();
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(
            flat(&transpose_matrix(&rows).unwrap()),
            flat(&rows.t().unwrap().contiguous().unwrap())
        );
        let view = big.t().unwrap();
        assert_eq!(flat(&transpose_matrix(&view).unwrap()), flat(&big));
    }
}
