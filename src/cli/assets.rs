//! Files embedded in the binary, unpacked on first use into the user's cache folder.

use std::path::PathBuf;

use anyhow::{Context, Result};

const CLIP_TOKENIZER: [(&str, &[u8]); 4] = [
    (
        "vocab.json",
        include_bytes!("../../assets/clip-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("../../assets/clip-tokenizer/merges.txt"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../../assets/clip-tokenizer/special_tokens_map.json"),
    ),
];

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TEXT2IMG_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("text2img");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("text2img")
}

/// Unpacks `files` into `cache/name-VERSION/` (atomically: a temp folder, then a rename).
fn unpack(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let root = cache_root();
    let dir = root.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (file, bytes) in files {
        let path = tmp.join(file);
        std::fs::create_dir_all(path.parent().expect("has parent"))
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() && !dir.is_dir() {
        anyhow::bail!("cannot create {}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(dir)
}

/// The CLIP tokenizer files (vocab.json, merges.txt, configs) as a folder.
pub fn clip_tokenizer_dir() -> Result<PathBuf> {
    unpack(
        &format!("clip-tokenizer-{:016x}", fingerprint(&CLIP_TOKENIZER)),
        &CLIP_TOKENIZER,
    )
}

/// The default model (trained by `scripts/train-default-model`), embedded in the binary.
/// Its tokenizer shares the CLIP vocabulary files above.
const DEFAULT_MODEL: [(&str, &[u8]); 15] = [
    (
        "model_index.json",
        include_bytes!("../../assets/default-model/model_index.json"),
    ),
    (
        "text2img.json",
        include_bytes!("../../assets/default-model/text2img.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_bytes!("../../assets/default-model/scheduler/scheduler_config.json"),
    ),
    (
        "tokenizer/vocab.json",
        include_bytes!("../../assets/clip-tokenizer/vocab.json"),
    ),
    (
        "tokenizer/merges.txt",
        include_bytes!("../../assets/clip-tokenizer/merges.txt"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_bytes!("../../assets/clip-tokenizer/special_tokens_map.json"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_bytes!("../../assets/default-model/tokenizer/tokenizer_config.json"),
    ),
    (
        "text_encoder/config.json",
        include_bytes!("../../assets/default-model/text_encoder/config.json"),
    ),
    (
        "text_encoder/model.safetensors",
        include_bytes!("../../assets/default-model/text_encoder/model.safetensors"),
    ),
    (
        "unet/config.json",
        include_bytes!("../../assets/default-model/unet/config.json"),
    ),
    (
        "unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../../assets/default-model/unet/diffusion_pytorch_model.safetensors"),
    ),
    (
        "guide_unet/config.json",
        include_bytes!("../../assets/default-model/guide_unet/config.json"),
    ),
    (
        "guide_unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../../assets/default-model/guide_unet/diffusion_pytorch_model.safetensors"),
    ),
    (
        "vae/config.json",
        include_bytes!("../../assets/default-model/vae/config.json"),
    ),
    (
        "vae/diffusion_pytorch_model.safetensors",
        include_bytes!("../../assets/default-model/vae/diffusion_pytorch_model.safetensors"),
    ),
];

/// FNV-1a over the embedded files, so a rebuilt model never reuses a stale unpacked copy.
fn fingerprint(files: &[(&str, &[u8])]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, bytes) in files {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The name the built-in model goes by in metadata.
pub const DEFAULT_MODEL_NAME: &str = "text2img-default-shapes";

/// The built-in default model, as a diffusers-layout folder.
pub fn default_model_dir() -> Result<PathBuf> {
    unpack(
        &format!("default-model-{:016x}", fingerprint(&DEFAULT_MODEL)),
        &DEFAULT_MODEL,
    )
}

/// Which model to load and how: the flags `generate`, `serve` and `bench` share.
#[derive(Clone, clap::Args)]
pub struct ModelArgs {
    /// A diffusers-layout model folder, a single-file checkpoint (.safetensors), or a
    /// Hugging Face repo id (ORG/NAME); default: the built-in model (trained on the `shapes`
    /// data set).
    #[arg(long)]
    pub model: Option<String>,
    /// For a single file: a diffusers folder, or a Hugging Face repo id (ORG/NAME: its
    /// configs only, from the cache or downloaded), whose configs describe it (for
    /// architectures other than the released SD 1.x/2.x/XL ones).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub config: Option<std::path::PathBuf>,
    /// For a single file: what the U-Net predicts (default: the config's; SD 2.x files are
    /// probed, as A1111 does).
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// For a single file: the original training code's yaml (default: NAME.yaml beside the
    /// file, as A1111 reads it). It gives the U-Net's and VAE's layout, the noise schedule and
    /// the prediction type (`parameterization: "v"`), over --config's or the built-in ones.
    #[arg(long, value_name = "FILE.yaml")]
    pub original_config: Option<std::path::PathBuf>,
    /// For a single file: load the U-Net's EMA weights (`model_ema.*`).
    #[arg(long)]
    pub ema: bool,
    /// A textual-inversion embedding (.pt, .bin, .safetensors; repeatable): its file name,
    /// without the extension, in a prompt stands for its vectors.
    #[arg(long = "embedding", value_name = "FILE")]
    pub embeddings: Vec<std::path::PathBuf>,
    /// Every embedding in a folder (those for another model's text encoders are left out,
    /// with a warning).
    #[arg(long, value_name = "DIR")]
    pub embeddings_dir: Option<std::path::PathBuf>,
    /// A LoRA merged into the model (repeatable): FILE, or FILE:WEIGHT (default 1).
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", value_parser = parse_lora)]
    pub loras: Vec<text2img::pipeline::LoraSpec>,
    /// Where `<lora:NAME:WEIGHT>` in a prompt finds NAME.safetensors (A1111's Lora folder).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<std::path::PathBuf>,
    /// Load `*.{variant}.safetensors` weights (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// Another VAE in place of the model's: an AutoencoderKL folder, or one file in the
    /// original or diffusers layout (e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<std::path::PathBuf>,
    /// An SDXL refiner (a diffusers folder or a single file) that finishes the steps after the handover
    /// (--refiner-start, or a request's refiner_switch_at; default 0.8).
    #[arg(long, value_name = "DIR")]
    pub refiner: Option<std::path::PathBuf>,
    /// Keep weight matrices and kernels as f32, or f16/bf16 for half the memory.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Multiply the layers kept in bf16 (`--dtype bf16`) in bf16, on AMX tiles or AVX-512
    /// BF16 where the CPU has them (elsewhere they are widened to f32, as by default).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub compute: ComputeDtype,
}

/// `--lora FILE[:WEIGHT]`.
pub fn parse_lora(text: &str) -> Result<text2img::pipeline::LoraSpec, String> {
    let (path, weight) = match text.rsplit_once(':') {
        Some((path, w)) if w.parse::<f64>().is_ok() => (path, w.parse::<f64>().unwrap_or(1.0)),
        _ => (text, 1.0),
    };
    if !weight.is_finite() {
        return Err(format!("`{text}`: the weight must be a number"));
    }
    Ok(text2img::pipeline::LoraSpec {
        path: path.into(),
        text_weight: weight,
        unet_weight: weight,
    })
}

/// `--compute`: the dtype of the products of layers kept in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, clap::ValueEnum)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ModelArgs {
    /// Where `--model` points: a folder, a file or a repo id (the built-in model's folder
    /// when none is given), without loading it.
    pub fn source(&self) -> Result<String> {
        Ok(match self.model.as_deref() {
            Some(m) => m.to_string(),
            None => default_model_dir()?.display().to_string(),
        })
    }

    /// The pipeline and where it came from, with the embeddings and LoRAs asked for.
    pub fn load(&self) -> Result<(text2img::Pipeline, String)> {
        self.load_with(&[])
    }

    /// [`ModelArgs::load`] with LoRAs that a prompt names (`<lora:NAME:W>`) besides `--lora`.
    pub fn load_with(
        &self,
        tags: &[text2img::text::extra_networks::LoraTag],
    ) -> Result<(text2img::Pipeline, String)> {
        let mut loras = self.loras.clone();
        for tag in tags {
            let Some(dir) = &self.lora_dir else {
                anyhow::bail!("the prompt names <lora:{}>: give --lora-dir DIR", tag.name);
            };
            let path = ["safetensors", "pt", "ckpt"]
                .iter()
                .map(|e| dir.join(format!("{}.{e}", tag.name)))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "<lora:{}>: no {}.safetensors in {}",
                        tag.name,
                        tag.name,
                        dir.display()
                    )
                })?;
            loras.push(text2img::pipeline::LoraSpec {
                path,
                text_weight: tag.text_weight,
                unet_weight: tag.unet_weight,
            });
        }
        let (mut pipeline, source) = self.load_model(loras)?;
        if let Some(dir) = &self.refiner {
            let options = text2img::LoadOptions {
                weight_dtype: self.dtype.dtype(),
                ..Default::default()
            };
            let refiner = if dir.is_file() {
                let options = text2img::pipeline::SingleFileOptions {
                    load: options,
                    ..Default::default()
                };
                text2img::Pipeline::load_single_file(dir, &options)
            } else {
                text2img::pipeline::load_local(dir, &options)
            }
            .with_context(|| format!("loading refiner {}", dir.display()))?;
            pipeline.set_refiner(refiner)?;
        }
        for warning in &pipeline.load_warnings {
            eprintln!("warning: {warning}");
        }
        if let Some(dir) = &self.embeddings_dir {
            let (found, unread) = text2img::text::embeddings::Embedding::load_dir(dir)
                .with_context(|| format!("--embeddings-dir {}", dir.display()))?;
            for warning in unread.iter().chain(&pipeline.add_embeddings(found, false)?) {
                eprintln!("warning: {warning}");
            }
        }
        let named = self
            .embeddings
            .iter()
            .map(|p| text2img::text::embeddings::Embedding::load(p))
            .collect::<text2img::Result<Vec<_>>>()?;
        pipeline.add_embeddings(named, true)?;
        Ok((pipeline, source))
    }

    fn load_model(
        &self,
        loras: Vec<text2img::pipeline::LoraSpec>,
    ) -> Result<(text2img::Pipeline, String)> {
        if self.compute == ComputeDtype::Bf16 {
            if !matches!(self.dtype, WeightDtype::Bf16) {
                anyhow::bail!("--compute bf16 multiplies weights kept in bf16: add --dtype bf16");
            }
            if !text2img::kernels::matmul_bf16::enable(true) {
                eprintln!(
                    "warning: this CPU has no bf16 products (AVX-512 BF16); computing in f32"
                );
            }
        }
        let single_file = self
            .model
            .as_deref()
            .map(std::path::Path::new)
            .filter(|p| p.is_file());
        match single_file {
            Some(path) => {
                let options = text2img::pipeline::SingleFileOptions {
                    load: text2img::LoadOptions {
                        weight_dtype: self.dtype.dtype(),
                        loras,
                        vae: self.vae.clone(),
                        ..Default::default()
                    },
                    config: self
                        .config
                        .as_deref()
                        .map(text2img::weights::folder::config_folder)
                        .transpose()
                        .context("--config")?,
                    prediction_type: self.prediction_type.clone(),
                    ema: self.ema,
                    original_config: self.original_config.clone(),
                };
                let pipeline = text2img::Pipeline::load_single_file(path, &options)
                    .with_context(|| format!("loading checkpoint {}", path.display()))?;
                Ok((pipeline, path.display().to_string()))
            }
            None => {
                if self.config.is_some()
                    || self.prediction_type.is_some()
                    || self.ema
                    || self.original_config.is_some()
                {
                    anyhow::bail!(
                        "--config, --original-config, --prediction-type and --ema apply to a single-file --model"
                    );
                }
                load_model(
                    self.model.as_deref(),
                    self.variant.clone(),
                    self.dtype,
                    loras,
                    self.vae.clone(),
                )
            }
        }
    }
}

/// Loads `--model` (a folder or a repo id), or the built-in model when none is given.
/// Returns the pipeline and where it came from.
pub fn load_model(
    model: Option<&str>,
    variant: Option<String>,
    dtype: WeightDtype,
    loras: Vec<text2img::pipeline::LoraSpec>,
    vae: Option<std::path::PathBuf>,
) -> Result<(text2img::Pipeline, String)> {
    let source = match model {
        Some(m) => m.to_string(),
        None => default_model_dir()?.display().to_string(),
    };
    let options = text2img::LoadOptions {
        variant,
        weight_dtype: dtype.dtype(),
        loras,
        vae,
        ..Default::default()
    };
    let mut pipeline = text2img::Pipeline::load(&source, &options)
        .with_context(|| format!("loading model {source}"))?;
    if model.is_none() {
        pipeline.name = DEFAULT_MODEL_NAME.into();
    }
    Ok((pipeline, source))
}

/// `--dtype`: how the weight matrices and convolution kernels are kept in memory.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum WeightDtype {
    #[default]
    F32,
    /// Half the memory; computation stays f32.
    F16,
    /// Half the memory, f32's range; computation stays f32 (see `--compute`).
    Bf16,
    /// int8 with a scale per output channel: a quarter of f32's memory; computation stays
    /// f32. A model that `convert --dtype q8` wrote is q8 whatever this says.
    Q8,
}

impl WeightDtype {
    pub fn dtype(self) -> text2img::weights::MatrixDtype {
        use text2img::weights::MatrixDtype;
        match self {
            Self::F32 => MatrixDtype::F32,
            Self::F16 => MatrixDtype::F16,
            Self::Bf16 => MatrixDtype::Bf16,
            Self::Q8 => MatrixDtype::Q8,
        }
    }
}
