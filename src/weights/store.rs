//! Memory-mapped safetensors weights with strict bookkeeping: every tensor the model asks for
//! must exist with the configured shape, and every stored tensor must be used, so a model
//! folder that does not match its config fails loudly instead of producing noise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use super::matrix::{Matrix, MatrixDtype};
use super::params::ParamStore;
use super::q8::{Q8Matrix, SCALE_SUFFIX};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Stored,
    shape: Vec<usize>,
    /// Byte range inside the shard's file.
    start: usize,
    end: usize,
    /// A 2-D tensor stored transposed (OpenCLIP's `text_projection`): transposed as it loads.
    transposed: bool,
}

/// How a tensor's values are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stored {
    Float(DType),
    /// The int8 values of a q8 weight; its scales are the f32 tensor `{name}_scale`.
    Int8,
}

impl Stored {
    /// The safetensors dtypes read and written, both ways; `None` for the others.
    const SAFETENSORS: [(StDtype, Stored); 6] = [
        (StDtype::F32, Stored::Float(DType::F32)),
        (StDtype::F16, Stored::Float(DType::F16)),
        (StDtype::BF16, Stored::Float(DType::BF16)),
        (StDtype::F64, Stored::Float(DType::F64)),
        (StDtype::I64, Stored::Float(DType::I64)),
        (StDtype::I8, Stored::Int8),
    ];

    fn from_safetensors(dtype: StDtype) -> Option<Self> {
        Self::SAFETENSORS
            .iter()
            .find(|(st, _)| *st == dtype)
            .map(|(_, stored)| *stored)
    }

    /// The safetensors dtype of a tensor stored so (`None`: one safetensors has no name for).
    pub fn safetensors(self) -> Option<StDtype> {
        Self::SAFETENSORS
            .iter()
            .find(|(_, stored)| *stored == self)
            .map(|(st, _)| *st)
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::Float(dtype) => dtype.size_in_bytes(),
            Self::Int8 => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Float(dtype) => dtype.as_str(),
            Self::Int8 => "i8",
        }
    }
}

/// Where a component's tensor is in a whole checkpoint ([`Weights::component`]).
#[derive(Clone, Debug)]
pub enum Piece {
    /// The stored tensor as it is.
    Whole(String),
    /// Rows `start..start + len` of the stored tensor's first dimension (one of q, k, v in a
    /// fused projection): a contiguous byte range, read without the rest.
    Rows {
        stored: String,
        start: usize,
        len: usize,
    },
    /// The stored 2-D tensor, transposed.
    Transposed(String),
    /// A 1x1 convolution kernel read as the matrix it is (the original VAE's attention).
    Matrix(String),
}

impl Piece {
    pub fn stored(&self) -> &str {
        match self {
            Piece::Whole(s) | Piece::Transposed(s) | Piece::Matrix(s) => s,
            Piece::Rows { stored, .. } => stored,
        }
    }
}

/// The weights of one model component (one folder such as `unet/`).
pub struct Weights {
    /// Each shard's path and open file. Tensors are read from the file, not from a mapping:
    /// pages of a mapping stay resident beside the loaded copies, so peak memory would be the
    /// file size on top of the model.
    shards: Arc<Vec<(PathBuf, Mutex<std::fs::File>)>>,
    entries: HashMap<String, Entry>,
    /// Canonical name -> stored name, for legacy names that diffusers also accepts.
    aliases: HashMap<String, String>,
    /// Stored names that are accepted and ignored.
    ignored: HashSet<String>,
    used: Mutex<HashSet<String>>,
    device: Device,
    /// The dtype every tensor is computed in.
    dtype: DType,
    /// How the large weight matrices and kernels are kept (`get_matrix`); f16/bf16 halve a
    /// model's memory, q8 quarters it, and layers widen one weight at a time as they run.
    /// Weights a file stores quantized stay so whatever this is.
    matrix_dtype: MatrixDtype,
    /// The stored names asked for as weight matrices (what `--dtype q8` quantizes, and so
    /// what a converted file stores quantized).
    matrices: Mutex<HashSet<String>>,
    /// Changes added to weights as they load (LoRAs), by name.
    patches: HashMap<String, Tensor>,
}

impl Weights {
    /// Opens the weights of a component folder: `model.safetensors` or
    /// `diffusion_pytorch_model.safetensors` (with `variant`, `*.{variant}.safetensors`), or
    /// the shards listed by the matching `*.safetensors.index.json`.
    pub fn open_component(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        let files = find_weight_files(dir, variant)?;
        Self::open_files(&files, device)
    }

    /// Opens one or more safetensors files as a single set of named tensors.
    pub fn open_files(files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (shard, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on
            // model files not being truncated while in use. The mapping serves the header
            // parse only (which touches the header's pages) and is dropped right after.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let bad = |reason: String| Error::Safetensors {
                path: path.clone(),
                reason,
            };
            let parsed = SafeTensors::deserialize(&mmap).map_err(|e| bad(e.to_string()))?;
            let (header_len, _) =
                SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
            let base = 8 + header_len;
            for (name, view) in parsed.tensors() {
                let Some(dtype) = Stored::from_safetensors(view.dtype()) else {
                    return Err(bad(format!(
                        "tensor `{name}` has unsupported dtype {:?}",
                        view.dtype()
                    )));
                };
                let data = view.data();
                let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
                debug_assert!(start >= base);
                entries.insert(
                    name.clone(),
                    Entry {
                        shard,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                        transposed: false,
                    },
                );
            }
            drop(parsed);
            drop(mmap);
            shards.push((path.clone(), Mutex::new(file)));
        }
        Ok(Self::from_entries(Arc::new(shards), entries, device))
    }

    /// Opens one weight file by its extension: `.safetensors`, or a PyTorch archive when the
    /// extension is one of `pickles`. `None` for any other extension (the caller says what it
    /// takes).
    pub fn open_single(path: &Path, pickles: &[&str], device: &Device) -> Result<Option<Self>> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("safetensors") => Ok(Some(Self::open_files(&[path.to_path_buf()], device)?)),
            Some(e) if pickles.contains(&e) => Ok(Some(Self::open_torch(path, device)?)),
            _ => Ok(None),
        }
    }

    /// Opens a PyTorch checkpoint (`.ckpt`/`.pt`), whose pickle is interpreted, never run
    /// (see [`super::torch_file`]).
    pub fn open_torch(path: &Path, device: &Device) -> Result<Self> {
        let tensors = super::torch_file::read_tensors(path)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let entries = tensors
            .into_iter()
            .map(|t| {
                let entry = Entry {
                    shard: 0,
                    dtype: Stored::Float(t.dtype),
                    shape: t.shape,
                    start: t.start,
                    end: t.end,
                    transposed: false,
                };
                (t.name, entry)
            })
            .collect();
        let shards = vec![(path.to_path_buf(), Mutex::new(file))];
        Ok(Self::from_entries(Arc::new(shards), entries, device))
    }

    fn from_entries(
        shards: Arc<Vec<(PathBuf, Mutex<std::fs::File>)>>,
        entries: HashMap<String, Entry>,
        device: &Device,
    ) -> Self {
        Self {
            shards,
            entries,
            aliases: HashMap::new(),
            ignored: HashSet::new(),
            used: Mutex::new(HashSet::new()),
            device: device.clone(),
            dtype: DType::F32,
            matrix_dtype: MatrixDtype::F32,
            matrices: Mutex::new(HashSet::new()),
            patches: HashMap::new(),
        }
    }

    /// Adds `delta` to each named weight as it loads (in f32, before the storage dtype).
    pub fn patch(&mut self, patches: HashMap<String, Tensor>) {
        self.patches.extend(patches);
    }

    /// Every tensor's name and shape, as the model asks for it.
    pub fn named_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut all: Vec<(String, Vec<usize>)> = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect();
        all.sort();
        all
    }

    /// One component's weights out of a whole checkpoint (a single file holding U-Net, VAE
    /// and text encoders under their own prefixes): each of the component's names with the
    /// stored tensor, or piece of one, that holds it. The file is shared, not read again; the
    /// stored tensors used here count as used in `self` too (see [`Weights::finish`]).
    pub fn component(&self, layout: &[(String, Piece)]) -> Result<Weights> {
        let mut entries = HashMap::new();
        for (name, piece) in layout {
            let stored = piece.stored();
            let Some(entry) = self.entries.get(stored) else {
                return Err(Error::MissingTensor {
                    path: self.path_of(None).to_path_buf(),
                    name: stored.to_string(),
                });
            };
            if entry.dtype == Stored::Int8 {
                return Err(self.bad_piece(
                    stored,
                    "is int8: quantized weights are read from diffusers folders (`text2img convert --dtype q8`), not from single files",
                ));
            }
            let mut entry = entry.clone();
            match piece {
                Piece::Whole(_) => {}
                Piece::Matrix(_) => {
                    if entry.shape.len() != 4 || entry.shape[2..] != [1, 1] {
                        return Err(self.bad_piece(stored, "is not a 1x1 convolution kernel"));
                    }
                    entry.shape.truncate(2);
                }
                Piece::Transposed(_) => {
                    if entry.shape.len() != 2 {
                        return Err(self.bad_piece(stored, "is not a matrix"));
                    }
                    entry.shape.reverse();
                    entry.transposed = true;
                }
                &Piece::Rows { start, len, .. } => {
                    let rows = entry.shape.first().copied().unwrap_or(0);
                    if start + len > rows {
                        return Err(self
                            .bad_piece(stored, &format!("has {rows} rows, not {}", start + len)));
                    }
                    let row_bytes = (entry.end - entry.start) / rows.max(1);
                    entry.start += start * row_bytes;
                    entry.end = entry.start + len * row_bytes;
                    entry.shape[0] = len;
                }
            }
            entries.insert(name.clone(), entry);
        }
        let used: Vec<String> = layout.iter().map(|(_, p)| p.stored().to_string()).collect();
        self.used.lock().unwrap().extend(used);
        Ok(Self::from_entries(
            self.shards.clone(),
            entries,
            &self.device,
        ))
    }

    fn bad_piece(&self, stored: &str, what: &str) -> Error {
        Error::Safetensors {
            path: self.path_of(Some(stored)).to_path_buf(),
            reason: format!("tensor `{stored}` {what}"),
        }
    }

    /// Every tensor in its stored float dtype (an int8 weight as its f32 values), by name.
    pub fn stored_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.names_sorted()
            .into_iter()
            .map(|name| {
                let entry = &self.entries[&name];
                let dtype = match entry.dtype {
                    Stored::Float(dtype) => dtype,
                    Stored::Int8 => DType::F32,
                };
                let tensor = self.get_as(&name, &entry.shape, dtype)?;
                Ok((name, tensor))
            })
            .collect()
    }

    /// A tensor as it is stored: in its float dtype, or (int8) as its q8 weight.
    pub fn stored(&self, name: &str) -> Result<Matrix> {
        let entry = self.entry(name)?;
        Ok(match entry.dtype {
            Stored::Float(dtype) => Matrix::Float(self.get_as(name, &entry.shape, dtype)?),
            Stored::Int8 => Matrix::Q8(Arc::new(self.read_q8(name, name, entry, &entry.shape)?)),
        })
    }

    /// Every tensor's name, sorted.
    pub fn names_sorted(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// How a tensor is stored, and its shape.
    pub fn layout(&self, name: &str) -> Result<(Stored, Vec<usize>)> {
        let entry = self.entry(name)?;
        Ok((entry.dtype, entry.shape.clone()))
    }

    /// The stored names asked for as weight matrices so far.
    pub fn matrix_names(&self) -> HashSet<String> {
        self.matrices.lock().unwrap().clone()
    }

    /// The stored tensors' names and shapes (what a checkpoint's architecture is read from).
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .map(|(name, e)| (name.as_str(), e.shape.as_slice()))
    }

    /// Keeps weight matrices and convolution kernels as `dtype`.
    pub fn store_matrices_as(&mut self, dtype: MatrixDtype) {
        self.matrix_dtype = dtype;
    }

    /// Accepts the stored name `stored` for the canonical name `canonical`.
    pub fn alias(&mut self, canonical: String, stored: String) {
        self.aliases.insert(canonical, stored);
    }

    /// Accepts and ignores a stored tensor (e.g. CLIP's `position_ids` buffer).
    pub fn ignore(&mut self, stored: &str) {
        if self.entries.contains_key(stored) {
            self.ignored.insert(stored.to_string());
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The file a tensor lives in (or the first shard), for error messages.
    fn path_of(&self, name: Option<&str>) -> &Path {
        let shard = name
            .and_then(|n| self.entries.get(n))
            .map_or(0, |e| e.shard);
        &self.shards[shard].0
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.aliases.contains_key(name)
    }

    /// Loads the tensor `name`, which must have exactly `shape`, as the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Loads a weight matrix or convolution kernel as the matrices are kept (a weight stored
    /// quantized stays so).
    pub fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        let stored = self.aliases.get(name).map_or(name, String::as_str);
        let entry = self.entry(stored)?;
        self.matrices.lock().unwrap().insert(stored.to_string());
        let int8 = entry.dtype == Stored::Int8;
        if int8 && !self.patches.contains_key(name) {
            return Ok(Matrix::Q8(Arc::new(
                self.read_q8(name, stored, entry, shape)?,
            )));
        }
        // A patched int8 weight is its f32 values plus the patch (`get_as`), quantized again.
        Ok(match self.matrix_dtype.float().filter(|_| !int8) {
            Some(dtype) => Matrix::Float(self.get_as(name, shape, dtype)?),
            None => {
                let weight = self.get_as(name, shape, DType::F32)?;
                Matrix::Q8(Arc::new(self.quantize(stored, &weight)?))
            }
        })
    }

    /// [`Q8Matrix::quantize`], its error naming the tensor and its file.
    fn quantize(&self, stored: &str, weight: &Tensor) -> Result<Q8Matrix> {
        Q8Matrix::quantize(weight)
            .map_err(|e| self.bad_piece(stored, &format!("cannot be quantized: {}", e.message())))
    }

    fn entry(&self, stored: &str) -> Result<&Entry> {
        self.entries
            .get(stored)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path_of(None).to_path_buf(),
                name: stored.to_string(),
            })
    }

    /// A q8 weight: the int8 tensor `stored` (which must have `shape`) and its scales.
    fn read_q8(
        &self,
        name: &str,
        stored: &str,
        entry: &Entry,
        shape: &[usize],
    ) -> Result<Q8Matrix> {
        self.check_shape(name, stored, entry, shape)?;
        if entry.transposed {
            return Err(self.bad_piece(stored, "is int8 and cannot be read transposed"));
        }
        let scale_name = format!("{stored}{SCALE_SUFFIX}");
        let rows = shape.first().copied().unwrap_or(1);
        let scales = match self.entries.get(&scale_name) {
            Some(e) if e.dtype == Stored::Float(DType::F32) && e.shape == [rows] => self
                .read(e)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Some(e) => {
                return Err(Error::Safetensors {
                    path: self.path_of(Some(&scale_name)).to_path_buf(),
                    reason: format!(
                        "`{scale_name}` must be f32 with one scale per row ([{rows}]), not {} {:?}",
                        e.dtype.name(),
                        e.shape
                    ),
                })
            }
            None => {
                return Err(Error::MissingTensor {
                    path: self.path_of(Some(stored)).to_path_buf(),
                    name: scale_name,
                })
            }
        };
        let values: Vec<i8> = self.read(entry)?.into_iter().map(|b| b as i8).collect();
        let mut used = self.used.lock().unwrap();
        used.insert(stored.to_string());
        used.insert(scale_name);
        drop(used);
        Q8Matrix::from_parts(values, scales, shape, &self.device)
            .map_err(|e| self.bad_piece(stored, &e.message()))
    }

    /// Fails unless the stored tensor has `shape`; `Ok(true)` where it is a 1x1 convolution
    /// kernel standing for that matrix under a legacy name (old checkpoints store the VAE
    /// attention projections so).
    fn check_shape(
        &self,
        name: &str,
        stored: &str,
        entry: &Entry,
        shape: &[usize],
    ) -> Result<bool> {
        let legacy_conv = stored != name
            && entry.shape.len() == 4
            && entry.shape[2..] == [1, 1]
            && shape.len() == 2;
        if entry.shape != shape && !(legacy_conv && entry.shape[..2] == shape[..]) {
            return Err(Error::ShapeMismatch {
                path: self.path_of(Some(stored)).to_path_buf(),
                name: stored.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(legacy_conv)
    }

    fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let stored = self.aliases.get(name).map_or(name, String::as_str);
        let entry = self.entry(stored)?;
        let stored_dtype = match entry.dtype {
            Stored::Float(dtype) => dtype,
            // A quantized weight read as a plain tensor: its f32 values.
            Stored::Int8 => {
                let q = self.read_q8(name, stored, entry, shape)?;
                let tensor = match self.patches.get(name) {
                    Some(delta) => (q.dequantize()? + delta)?,
                    None => q.dequantize()?,
                };
                return Ok(tensor.to_dtype(dtype)?);
            }
        };
        let legacy_conv = self.check_shape(name, stored, entry, shape)?;
        self.used.lock().unwrap().insert(stored.to_string());
        let tensor = if stored_dtype == DType::F32 && cfg!(target_endian = "little") {
            // Straight into the tensor's own buffer: no byte buffer and second copy (SD 1.5's
            // 4.3 GB of f32 weights).
            let values = self.read_f32(entry)?;
            Tensor::from_vec(values, entry.shape.as_slice(), &self.device)?
        } else {
            let bytes = self.read(entry)?;
            Tensor::from_raw_buffer(&bytes, stored_dtype, &entry.shape, &self.device)?
        };
        let tensor = if legacy_conv {
            tensor.reshape(shape)?
        } else if entry.transposed {
            // Read in the stored (reversed) shape, then transposed into the asked-for one.
            tensor
                .reshape([entry.shape[1], entry.shape[0]].as_slice())?
                .t()?
                .contiguous()?
        } else {
            tensor
        };
        let tensor = match self.patches.get(name) {
            Some(delta) => (tensor.to_dtype(DType::F32)? + delta)?,
            None => tensor,
        };
        Ok(tensor.to_dtype(dtype)?)
    }

    /// An f32 tensor's values (safetensors stores little-endian; callers check the host is).
    fn read_f32(&self, entry: &Entry) -> Result<Vec<f32>> {
        let len = entry.end - entry.start;
        if !len.is_multiple_of(4) {
            return Err(Error::Safetensors {
                path: self.shards[entry.shard].0.clone(),
                reason: format!("an f32 tensor of {len} bytes"),
            });
        }
        let mut values = Vec::<f32>::with_capacity(len / 4);
        self.read_into(entry, values.as_mut_ptr().cast::<u8>())?;
        // SAFETY: `read_into` wrote all `len` bytes; every bit pattern is a valid f32.
        unsafe { values.set_len(len / 4) };
        Ok(values)
    }

    fn read(&self, entry: &Entry) -> Result<Vec<u8>> {
        let len = entry.end - entry.start;
        let mut bytes = Vec::<u8>::with_capacity(len);
        self.read_into(entry, bytes.as_mut_ptr())?;
        // SAFETY: `read_into` wrote all `len` bytes.
        unsafe { bytes.set_len(len) };
        Ok(bytes)
    }

    /// Reads a tensor's bytes from its shard to `buffer`, which has room for exactly its
    /// length and need not be initialised: a model's gigabytes are not zeroed first only to
    /// be overwritten (SD 1.5's 4.3 GB of f32: zeroing was a fifth of its load). Large
    /// tensors are read in parts on several threads, which also share the work of mapping
    /// the fresh pages.
    fn read_into(&self, entry: &Entry, buffer: *mut u8) -> Result<()> {
        // SAFETY: the buffer has room for the tensor's bytes.
        let (path, file) = &self.shards[entry.shard];
        let file = file.lock().unwrap_or_else(|e| e.into_inner());
        let len = entry.end - entry.start;
        const PART: usize = 16 << 20;
        // Parts read at their own offsets (`pread`); elsewhere one seek and read.
        let threads = if cfg!(unix) {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let parts = len.div_ceil(PART).clamp(1, threads);
        let step = len.div_ceil(parts);
        let target = SendPtr(buffer);
        let read_part = |k: usize| -> std::io::Result<()> {
            let from = k * step;
            let to = (from + step).min(len);
            // SAFETY: the parts are disjoint ranges inside the buffer's `len` bytes.
            let part = unsafe { target.at(from) };
            // The fresh pages mapped in one call rather than faulted in one by one by the
            // read (SD 1.5, 512x512 bench, two runs each, measured with the weights in small
            // pages: load 2.2-2.5 -> 1.9-2.0 s).
            crate::alloc_count::populate(part, to - from);
            // SAFETY: as above.
            unsafe { read_exact_at(&file, part, to - from, entry.start + from) }
        };
        let result = if parts == 1 {
            read_part(0)
        } else {
            use rayon::prelude::*;
            (0..parts).into_par_iter().try_for_each(read_part)
        };
        result.map_err(|e| Error::io(path, e))
    }

    /// Fails if a stored tensor was never asked for: the folder holds a different model than
    /// its config describes.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.lock().unwrap();
        let mut unused: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (name, entry) in &self.entries {
            if !used.contains(name) && !self.ignored.contains(name) {
                unused.entry(entry.shard).or_default().push(name.clone());
            }
        }
        if let Some((shard, mut names)) = unused.into_iter().next() {
            names.sort();
            return Err(Error::UnusedTensors {
                path: self.shards[shard].0.clone(),
                names,
            });
        }
        Ok(())
    }

    /// A view that prefixes names, mirroring the module tree (`down_blocks.0.resnets.1`).
    pub fn root(&self) -> Vb<'_> {
        Vb {
            source: Source::Stored(self),
            prefix: String::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Stored(&'a Weights),
    Fresh(&'a ParamStore),
}

/// A prefixed view into stored weights or fresh trainable parameters: the model code names
/// its sub-modules exactly like the checkpoint's tensor prefixes, so the diffusers layout
/// needs no mapping table, and training saves under the same names.
#[derive(Clone)]
pub struct Vb<'a> {
    source: Source<'a>,
    prefix: String,
}

impl<'a> From<&'a ParamStore> for Vb<'a> {
    fn from(params: &'a ParamStore) -> Self {
        Vb {
            source: Source::Fresh(params),
            prefix: String::new(),
        }
    }
}

impl<'a> Vb<'a> {
    pub fn pp(&self, part: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.prefix)
        };
        Vb {
            source: self.source,
            prefix,
        }
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        match self.source {
            Source::Stored(w) => w.get(&self.name(leaf), shape),
            Source::Fresh(p) => p.get_or_init(&self.name(leaf), shape),
        }
    }

    /// A weight matrix or convolution kernel: as the stored weights keep matrices (see
    /// [`Weights::store_matrices_as`]); fresh parameters are always f32.
    pub fn get_matrix(&self, leaf: &str, shape: &[usize]) -> Result<Matrix> {
        match self.source {
            Source::Stored(w) => w.get_matrix(&self.name(leaf), shape),
            Source::Fresh(p) => Ok(Matrix::Float(p.get_or_init(&self.name(leaf), shape)?)),
        }
    }

    /// Whether a stored tensor exists (fresh parameters: never, so optional parts are
    /// created only where the config asks for them).
    pub fn contains(&self, leaf: &str) -> bool {
        match self.source {
            Source::Stored(w) => w.contains(&self.name(leaf)),
            Source::Fresh(_) => false,
        }
    }

    pub fn device(&self) -> &'a Device {
        match self.source {
            Source::Stored(w) => w.device(),
            Source::Fresh(p) => p.device(),
        }
    }
}

const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

fn weight_suffix(variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!(".{v}.safetensors"),
        None => ".safetensors".to_string(),
    }
}

/// Where a component folder's weights of `variant` are: a single file, or a shard index.
enum WeightEntry {
    Single(PathBuf),
    Index(PathBuf),
}

fn weight_entry(dir: &Path, variant: Option<&str>) -> Option<WeightEntry> {
    let suffix = weight_suffix(variant);
    WEIGHT_STEMS.iter().find_map(|stem| {
        let single = dir.join(format!("{stem}{suffix}"));
        let index = dir.join(format!("{stem}{suffix}.index.json"));
        if single.is_file() {
            Some(WeightEntry::Single(single))
        } else if index.is_file() {
            Some(WeightEntry::Index(index))
        } else {
            None
        }
    })
}

/// Whether a component folder holds weights of `variant` (a file or a shard index by the
/// names [`find_weight_files`] looks for).
pub fn has_weight_files(dir: &Path, variant: Option<&str>) -> bool {
    weight_entry(dir, variant).is_some()
}

/// The safetensors file(s) of a component folder.
pub fn find_weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    match weight_entry(dir, variant) {
        Some(WeightEntry::Single(file)) => return Ok(vec![file]),
        Some(WeightEntry::Index(index)) => return shards_from_index(&index),
        None => {}
    }
    let suffix = weight_suffix(variant);
    let expected: Vec<String> = WEIGHT_STEMS
        .iter()
        .map(|s| format!("{s}{suffix}"))
        .collect();
    if !dir.is_dir() {
        return Err(Error::config(dir, "component folder is missing"));
    }
    Err(Error::config(
        dir,
        format!(
            "no weights found: expected {} (or a sharded *.safetensors.index.json){}",
            expected.join(" or "),
            if variant.is_some() {
                ""
            } else {
                "; for fp16-only folders pass --variant fp16"
            }
        ),
    ))
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index = crate::error::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.is_file() {
            return Err(Error::config(
                index,
                format!("lists shard {} which is missing", p.display()),
            ));
        }
    }
    Ok(paths)
}

/// A buffer's start, shared by the threads that fill disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the threads write disjoint ranges, and the buffer outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut u8 {
        unsafe { self.0.add(offset) }
    }
}

/// Reads `len` bytes at `offset` of `file` into `buffer`, which may be uninitialised (the
/// bytes go through a raw pointer, never a slice of uninitialised memory).
///
/// # Safety
/// `buffer` must be valid for writes of `len` bytes.
#[cfg(unix)]
unsafe fn read_exact_at(
    file: &std::fs::File,
    buffer: *mut u8,
    len: usize,
    offset: usize,
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0;
    while done < len {
        let want = (len - done).min(1 << 30);
        // SAFETY: the caller's buffer has room for `len` bytes; `done + want <= len`.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buffer.add(done).cast(),
                want,
                (offset + done) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ends inside a tensor",
                ))
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Elsewhere: zeroed first, then read (through a slice).
///
/// # Safety
/// `buffer` must be valid for writes of `len` bytes.
#[cfg(not(unix))]
unsafe fn read_exact_at(
    file: &std::fs::File,
    buffer: *mut u8,
    len: usize,
    offset: usize,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    // SAFETY: the caller's buffer has room for `len` bytes; zeroed before the slice is made.
    let slice = unsafe {
        std::ptr::write_bytes(buffer, 0, len);
        std::slice::from_raw_parts_mut(buffer, len)
    };
    let mut file = file;
    file.seek(SeekFrom::Start(offset as u64))?;
    file.read_exact(slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor larger than one read part is read in parts on several threads; every byte
    /// must land where it belongs (and an f16 tensor of odd length in one read).
    #[test]
    fn large_tensors_read_in_parts_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let n = (40 << 20) / 4 + 3; // 40 MB and 12 bytes: three parts, the last short
        let big: Vec<f32> = (0..n).map(|i| (i as f32).mul_add(0.5, -7.0)).collect();
        let small: Vec<half::f16> = (0..7).map(|i| half::f16::from_f32(i as f32)).collect();
        let tensors = HashMap::from([
            (
                "big",
                Tensor::from_vec(big.clone(), n, &Device::Cpu).unwrap(),
            ),
            (
                "small",
                Tensor::from_vec(small.clone(), 7, &Device::Cpu).unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let weights = Weights::open_files(std::slice::from_ref(&path), &Device::Cpu).unwrap();
            let read: Vec<f32> = weights.get("big", &[n]).unwrap().to_vec1().unwrap();
            assert!(
                read == big,
                "the parts of a large tensor came back out of place"
            );
            let read = weights.get_as("small", &[7], DType::F16).unwrap();
            assert_eq!(read.to_vec1::<half::f16>().unwrap(), small);
        });
    }
}
