//! One training step's loss and gradients, text encoder and U-Net together, against the ones
//! PyTorch computed for the same tiny model and batch
//! (scripts/fixtures/training_gradients.py). The kernels' backward passes are each tested
//! against composed candle ops; this checks the assembled model: every parameter trainable,
//! every gradient path (cross-attention into the text encoder, the time embedding, the skip
//! connections) present and right.

mod parity;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use parity::{fixtures, model_dir};
use text2img::latent::unet::{UNet, UNetConfig};
use text2img::text::clip::{ClipTextConfig, ClipTextModel};
use text2img::train::latent::NoisyBatch;
use text2img::weights::{ParamStore, Vb};

fn load(path: &std::path::Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The fixture's sample of a gradient: at most 256 elements at a stride of numel / 256.
fn strided_sample(flat: &[f32]) -> Vec<f32> {
    let stride = (flat.len() / 256).max(1);
    flat.iter().step_by(stride).take(256).copied().collect()
}

struct Model {
    unet: UNet,
    text: ClipTextModel,
    unet_params: ParamStore,
    text_params: ParamStore,
}

/// The sd1-tiny fixture's text encoder and U-Net as trainable parameters, built as `train`
/// builds them, holding the fixture's weights.
fn trainable_model() -> Model {
    let dir = model_dir("sd1-tiny");
    let device = Device::Cpu;
    let text_params = ParamStore::new(0, &device);
    let text_config = ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    let text = ClipTextModel::from_vb(text_config, &Vb::from(&text_params).pp("text_model"), None)
        .unwrap();
    let unet_params = ParamStore::new(1, &device);
    let unet = UNet::from_weights(
        UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
        &Vb::from(&unet_params),
    )
    .unwrap();
    unet_params
        .load_values(&load(&dir.join("unet/diffusion_pytorch_model.safetensors")))
        .unwrap();
    text_params
        .load_values(&load(&dir.join("text_encoder/model.safetensors")))
        .unwrap();
    Model {
        unet,
        text,
        unet_params,
        text_params,
    }
}

#[test]
fn a_training_step_has_pytorchs_loss_and_gradients() {
    let reference = load(&fixtures().join("reference/training_gradients.safetensors"));
    let get = |k: &str| reference.get(k).unwrap_or_else(|| panic!("no {k}")).clone();
    let model = trainable_model();
    let ids: Vec<Vec<u32>> = get("ids")
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    let batch = NoisyBatch {
        ids,
        noisy: get("noisy"),
        timesteps: to_vec(&get("timesteps"))
            .iter()
            .map(|&t| t as f64)
            .collect(),
        target: get("target"),
        weights: Some(get("weights").reshape((2, 1, 1, 1)).unwrap()),
    };
    let (loss, grads) = batch
        .loss_and_grads(&model.text, &model.unet, 0, 2)
        .unwrap();
    let want = to_vec(&get("loss"))[0] as f64;
    assert!(
        (loss - want).abs() <= 1e-5 * want,
        "loss {loss} vs PyTorch {want}"
    );
    // Two shards of one sample each sum to the whole batch (what `train` does per thread).
    let (l0, g0) = batch
        .loss_and_grads(&model.text, &model.unet, 0, 1)
        .unwrap();
    let (l1, g1) = batch
        .loss_and_grads(&model.text, &model.unet, 1, 1)
        .unwrap();
    assert!(
        (l0 + l1 - loss).abs() <= 1e-5 * loss,
        "{l0} + {l1} vs {loss}"
    );

    let used: Vec<u32> = to_vec(&get("used_ids").to_dtype(DType::F32).unwrap())
        .iter()
        .map(|&v| v as u32)
        .collect();
    let vars: Vec<_> = model
        .unet_params
        .vars()
        .into_iter()
        .map(|(k, v)| (format!("unet.{k}"), v))
        .chain(model.text_params.vars().into_iter().map(|(k, v)| {
            let k = k.strip_prefix("text_model.").unwrap_or(&k).to_string();
            (format!("text_encoder.{k}"), v)
        }))
        .collect();
    let norm_of = |name: &str| to_vec(&get(&format!("{name}.norm")))[0];
    let largest = vars.iter().map(|(n, _)| norm_of(n)).fold(0f32, f32::max);
    let distance = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let mut checked = 0;
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let want_norm = norm_of(name);
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient (PyTorch's norm {want_norm})"));
        let norm = to_vec(&grad.sqr().unwrap().sum_all().unwrap())[0].sqrt();
        checked += 1;
        // A key projection's bias shifts all of a query's scores alike, which softmax
        // ignores: its gradient is zero in exact arithmetic, rounding noise on both sides.
        if name.ends_with("k_proj.bias") {
            assert!(
                norm <= 1e-6 * largest && want_norm <= 1e-6 * largest,
                "{name}: {norm} / {want_norm}"
            );
            continue;
        }
        assert!(
            (norm - want_norm).abs() <= 1e-3 * want_norm,
            "{name}: gradient norm {norm} vs PyTorch {want_norm}"
        );
        let sharded =
            (g0.get(var.as_tensor()).unwrap() + g1.get(var.as_tensor()).unwrap()).unwrap();
        let (mut grad_rows, mut sharded_rows) = (grad.clone(), sharded);
        if name.ends_with("token_embedding.weight") {
            let rows = Tensor::new(used.as_slice(), &Device::Cpu).unwrap();
            grad_rows = grad.index_select(&rows, 0).unwrap();
            sharded_rows = sharded_rows.index_select(&rows, 0).unwrap();
        }
        let ours = strided_sample(&to_vec(&grad_rows));
        let ours_sharded = strided_sample(&to_vec(&sharded_rows));
        let theirs = to_vec(&get(&format!("{name}.sample")));
        assert_eq!(ours.len(), theirs.len(), "{name}: sample length");
        let scale = theirs.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = distance(&ours, &theirs) / scale;
        if err > worst.0 {
            worst = (err, name.clone());
        }
        assert!(
            err <= 1e-4,
            "{name}: sampled gradient off by {err} of its norm"
        );
        let split = distance(&ours, &ours_sharded) / scale;
        assert!(split <= 1e-4, "{name}: two shards' gradient off by {split}");
    }
    let expected = reference.keys().filter(|k| k.ends_with(".norm")).count();
    assert_eq!(checked, expected, "parameters compared vs PyTorch's");
    eprintln!(
        "{checked} gradients match; worst sample error {:e} of its norm ({})",
        worst.0, worst.1
    );
}
