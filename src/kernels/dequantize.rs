//! Widening int8 weights (`--dtype q8`) to f32 as a layer runs: `q * scale` per output
//! channel, compiled for the CPU's vector width (the baseline build's SSE2 widens int8 in
//! several shuffles where AVX2 takes one instruction: the U-Net's widening took 2.2 s of a
//! 512x512 step's 20.6 s of layers before).

/// `dst = q * scale`.
#[inline(always)]
fn row_generic(q: &[i8], scale: f32, dst: &mut [f32]) {
    for (d, &v) in dst.iter_mut().zip(q) {
        *d = v as f32 * scale;
    }
}

dispatch!(row, row_generic, (q: &[i8], scale: f32, dst: &mut [f32]));

/// `values` (rows of `row_len`, one scale each) widened into a new f32 buffer, spread over the
/// threads; `None` when the job was stopped meanwhile (rows may then be left unwritten).
pub fn dequantize(values: &[i8], scales: &[f32]) -> Option<Vec<f32>> {
    let row_len = values.len().checked_div(scales.len()).unwrap_or(0);
    // Zeroed by the allocator (fresh pages for large buffers, so no pass of its own there).
    let mut out = vec![0f32; values.len()];
    if row_len > 0 {
        super::parallel::for_each_chunk(&mut out, row_len, |r, chunk| {
            row(&values[r * row_len..][..row_len], scales[r], chunk)
        });
    }
    // A stopped job's chunks may have been skipped (`for_each_chunk` stops early).
    (!crate::cancel::requested()).then_some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn widens_each_row_by_its_scale_on_odd_sizes() {
        for (rows, row_len) in [(1, 1), (3, 7), (5, 33), (64, 1000)] {
            let values: Vec<i8> = (0..rows * row_len).map(|i| (i * 37 % 255) as i8).collect();
            let scales: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.25).collect();
            let got = super::dequantize(&values, &scales).unwrap();
            for (i, (g, v)) in got.iter().zip(&values).enumerate() {
                assert_eq!(
                    *g,
                    *v as f32 * scales[i / row_len],
                    "{rows}x{row_len} at {i}"
                );
            }
        }
        assert!(super::dequantize(&[], &[]).unwrap().is_empty());
    }
}
