//! Writes a component's weights as one safetensors file, one tensor at a time (a model is
//! never held twice in memory), with its weight matrices in another form where asked:
//! `convert --dtype q8` stores each as int8 values under its own name and its scales as
//! `{name}_scale` (f32, one per output channel), which [`super::Weights`] reads back as the
//! same q8 weight without quantizing again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use candle_core::DType;
use safetensors::tensor::View;

use super::matrix::{Matrix, MatrixDtype};
use super::q8::{Q8Matrix, SCALE_SUFFIX};
use super::store::Stored;
use super::Weights;
use crate::error::{Error, Result};

/// Writes every tensor of `weights` to `path` (a new file): those named in `matrices` as
/// `dtype` keeps weight matrices, the rest as stored (everything, for `None`). A weight stored
/// as int8 stays so for q8 and is refused for a float dtype (its values are the quantized
/// ones; no float file of them is made).
pub fn write_component(
    weights: &Weights,
    matrices: &HashSet<String>,
    dtype: Option<MatrixDtype>,
    path: &Path,
) -> Result<()> {
    let refuse = |why: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason: why,
    };
    // The header needs every tensor's dtype and size before the first byte of data.
    let mut planned: Vec<(String, Stored, Vec<usize>)> = Vec::new();
    for name in weights.names_sorted() {
        let (stored, shape) = weights.layout(&name)?;
        let matrix = matrices.contains(&name);
        let target = match (stored, dtype) {
            (Stored::Int8, Some(d)) if matrix && d != MatrixDtype::Q8 => {
                return Err(refuse(format!(
                    "`{name}` is stored as int8: it is not written as {}",
                    d.name()
                )))
            }
            (Stored::Float(_), Some(MatrixDtype::Q8)) if matrix => Stored::Int8,
            (Stored::Float(_), Some(other)) if matrix => {
                other.float().map_or(stored, Stored::Float)
            }
            _ => stored,
        };
        // A weight quantized here gets its scales; a stored int8 weight's are a tensor of
        // their own, planned as such.
        if target == Stored::Int8 && stored != Stored::Int8 {
            let scale = format!("{name}{SCALE_SUFFIX}");
            if weights.contains(&scale) {
                return Err(refuse(format!(
                    "`{scale}` exists already: `{name}` cannot be stored as int8"
                )));
            }
            let rows = shape.first().copied().unwrap_or(1);
            planned.push((scale, Stored::Float(DType::F32), vec![rows]));
        }
        planned.push((name, target, shape));
    }
    planned.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (name, dt, shape) in &planned {
        let len = shape.iter().product::<usize>() * dt.size();
        let st = dt
            .safetensors()
            .ok_or_else(|| refuse(format!("`{name}`: safetensors has no dtype for {dt:?}")))?;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": st, "shape": shape, "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({
            "format": "pt",
            "text2img.matrices": dtype.map_or("as stored", MatrixDtype::name),
        }),
    );
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::config(path, e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |e| Error::io(path, e);
    let file = std::fs::File::create_new(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    // The scales of the q8 weights made here, kept until written (they sort after them).
    let mut scales: HashMap<String, Vec<f32>> = HashMap::new();
    for (name, dt, shape) in &planned {
        if let Some(values) = scales.remove(name) {
            out.write_all(&f32_bytes(&values)).map_err(io)?;
            continue;
        }
        let bytes: Vec<u8> = match (weights.stored(name)?, dt) {
            (Matrix::Q8(q), Stored::Int8) => q.values().iter().map(|v| *v as u8).collect(),
            (Matrix::Float(t), Stored::Int8) => {
                let q = Q8Matrix::quantize(&t).map_err(|e| {
                    refuse(format!("`{name}` cannot be quantized: {}", e.message()))
                })?;
                scales.insert(format!("{name}{SCALE_SUFFIX}"), q.scales().to_vec());
                q.values().iter().map(|v| *v as u8).collect()
            }
            (Matrix::Float(t), Stored::Float(d)) => t.to_dtype(*d)?.data().into_owned(),
            (Matrix::Q8(_), Stored::Float(d)) => {
                return Err(refuse(format!(
                    "`{name}` is stored as int8 and cannot be written as {}",
                    d.as_str()
                )))
            }
        };
        if bytes.len() != shape.iter().product::<usize>() * dt.size() {
            return Err(refuse(format!(
                "`{name}`: {} bytes for a {dt:?} tensor of {shape:?}",
                bytes.len()
            )));
        }
        out.write_all(&bytes).map_err(io)?;
    }
    out.flush().map_err(io)?;
    out.get_ref().sync_all().map_err(io)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
