//! PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`): a zip archive holding `data.pkl`, a pickle
//! of nested dicts of tensors, and each tensor storage as an uncompressed file under `data/`.
//! The pickle is interpreted, never run ([`super::pickle`]); each tensor becomes a byte range
//! of the archive file, read in place like a safetensors tensor.

use std::path::Path;

use candle_core::DType;

use super::pickle::{self, TensorRef, Value};
use crate::error::{Error, Result};

/// The most a `data.pkl` may be: checkpoints' are kilobytes to a few megabytes.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// One tensor of a checkpoint: where its bytes are in the file.
pub struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The tensors of a PyTorch zip checkpoint: those of its `state_dict` when it has one (the
/// original training code's checkpoints), else of its top-level dict, named by their keys.
pub fn read_tensors(path: &Path) -> Result<Vec<StoredTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 2];
    {
        use std::io::Read;
        let mut f = &file;
        f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    }
    if head != *b"PK" {
        return Err(bad(
            path,
            "not a zip archive: a legacy (pre-1.6) PyTorch file, which text2img does not read; re-save it with torch.save or convert it to .safetensors",
        ));
    }
    let mut archive = zip::ZipArchive::new(&file)
        .map_err(|e| bad(path, format!("not a readable zip archive: {e}")))?;
    let pickle_name = (0..archive.len())
        .filter_map(|i| {
            archive
                .name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.into_owned())
        })
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or_else(|| {
            bad(
                path,
                "a zip archive without data.pkl: not a PyTorch checkpoint",
            )
        })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let pickle_bytes = {
        use std::io::Read;
        let entry = archive
            .by_name(&pickle_name)
            .map_err(|e| bad(path, format!("{pickle_name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(
                path,
                format!("{pickle_name} is {} bytes", entry.size()),
            ));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(path, format!("{pickle_name}: {e}")))?;
        bytes
    };
    let root = pickle::read(&pickle_bytes).map_err(|e| bad(path, format!("{pickle_name}: {e}")))?;
    let mut tensors = Vec::new();
    collect(&state_dict(&root), "", 0, &mut tensors);
    let mut stored = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        stored.push(locate(&mut archive, &prefix, name, &t).map_err(|m| bad(path, m))?);
    }
    Ok(stored)
}

/// The dict the weights are in.
fn state_dict(root: &Value) -> Value {
    if let Value::Dict(items) = root {
        for (k, v) in items.borrow().iter() {
            if matches!(k, Value::Str(s) if s == "state_dict") && matches!(v, Value::Dict(_)) {
                return v.clone();
            }
        }
    }
    root.clone()
}

/// How deep dicts may nest: a checkpoint's are two or three deep, and a pickle's dict may
/// contain itself.
const MAX_NESTING: usize = 8;

/// Every tensor in a dict, nested dicts' keys joined with dots.
fn collect(value: &Value, prefix: &str, depth: usize, out: &mut Vec<(String, TensorRef)>) {
    if depth > MAX_NESTING {
        return;
    }
    let Value::Dict(items) = value else { return };
    for (k, v) in items.borrow().iter() {
        let Value::Str(key) = k else { continue };
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Tensor(t) => out.push((name, t.clone())),
            Value::Dict(_) => collect(v, &name, depth + 1, out),
            _ => {}
        }
    }
}

fn dtype_of(storage: &str) -> Option<(DType, usize)> {
    Some(match storage {
        "FloatStorage" => (DType::F32, 4),
        "HalfStorage" => (DType::F16, 2),
        "BFloat16Storage" => (DType::BF16, 2),
        "DoubleStorage" => (DType::F64, 8),
        "LongStorage" => (DType::I64, 8),
        "ByteStorage" | "BoolStorage" => (DType::U8, 1),
        _ => return None,
    })
}

fn locate(
    archive: &mut zip::ZipArchive<&std::fs::File>,
    prefix: &str,
    name: String,
    t: &TensorRef,
) -> std::result::Result<StoredTensor, String> {
    let (dtype, size) = dtype_of(&t.dtype).unwrap_or((DType::U8, storage_size(&t.dtype)));
    let entry_name = format!("{prefix}data/{}", t.key);
    let entry = archive
        .by_name(&entry_name)
        .map_err(|e| format!("tensor `{name}`: storage {entry_name}: {e}"))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(format!(
            "tensor `{name}`: its storage is compressed; PyTorch stores them uncompressed"
        ));
    }
    let data_start = entry
        .data_start()
        .ok_or_else(|| format!("tensor `{name}`: no data offset for {entry_name}"))?;
    if t.shape.len() != t.stride.len() {
        return Err(format!("tensor `{name}`: shape and stride disagree"));
    }
    // Row-major strides: anything else (a transposed view saved as it is) is not read.
    let mut expect = 1usize;
    for (&dim, &stride) in t.shape.iter().zip(&t.stride).rev() {
        if dim > 1 && stride != expect {
            return Err(format!(
                "tensor `{name}` is not stored contiguously (strides {:?})",
                t.stride
            ));
        }
        expect = expect.saturating_mul(dim);
    }
    let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let bytes = count
        .and_then(|c| c.checked_mul(size))
        .ok_or_else(|| format!("tensor `{name}`: its shape {:?} overflows", t.shape))?;
    let start = t
        .offset
        .checked_mul(size)
        .and_then(|o| o.checked_add(bytes))
        .filter(|&end| end as u64 <= entry.size())
        .map(|end| end - bytes)
        .ok_or_else(|| format!("tensor `{name}` reaches past its storage {entry_name}"))?;
    let start = data_start as usize + start;
    let (shape, end) = if dtype_of(&t.dtype).is_some() {
        (t.shape.clone(), start + bytes)
    } else {
        // A type these models never use as a weight: kept as bytes, so that the tensor is
        // still reported if nothing expects it.
        (vec![bytes], start + bytes)
    };
    Ok(StoredTensor {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

fn storage_size(storage: &str) -> usize {
    match storage {
        "IntStorage" => 4,
        "ShortStorage" => 2,
        _ => 1,
    }
}
