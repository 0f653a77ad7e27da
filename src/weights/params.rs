//! Fresh, trainable parameters: the same model code that loads a checkpoint through [`Vb`]
//! creates its variables here instead, named exactly as they will be saved.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;

/// Trainable variables by checkpoint name, initialised as PyTorch initialises new layers.
pub struct ParamStore {
    vars: Mutex<BTreeMap<String, Var>>,
    rng: Mutex<u64>,
    device: Device,
}

impl ParamStore {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            vars: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(seed),
            device: device.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variable `name`, created on first use: weights of rank >= 2 uniform in
    /// +-1/sqrt(fan_in) (torch's default for Linear and Conv2d), embeddings N(0, 0.02),
    /// norm scales 1, biases 0.
    pub fn get_or_init(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut vars = self.vars.lock().unwrap();
        if let Some(v) = vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("bias") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else if name.contains("embedding") {
            (0..n).map(|_| 0.02 * self.normal()).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n)
                .map(|_| bound * (2.0 * self.uniform() - 1.0))
                .collect()
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    /// All variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.vars
            .lock()
            .unwrap()
            .values()
            .map(|v| v.elem_count())
            .sum()
    }

    /// The current values as plain tensors (for saving), optionally converted.
    pub fn tensors(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        self.vars
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
            .collect()
    }

    /// Overwrites existing variables with stored values (resuming a run).
    pub fn load_values(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        self.set_each(|name, _| {
            values.get(name).cloned().ok_or_else(|| {
                crate::Error::InvalidRequest(format!("checkpoint has no tensor `{name}`"))
            })
        })
    }

    /// Overwrites every variable with the same-named tensor of a model component's weights
    /// (fine-tuning an existing model); a missing tensor or a different shape is an error
    /// that names it.
    pub fn load_from(&self, weights: &super::Weights) -> Result<()> {
        self.set_each(|name, dims| weights.get(name, dims))
    }

    /// Sets each variable to `value(name, dims)`, converted to the variable's dtype.
    fn set_each(&self, value: impl Fn(&str, &[usize]) -> Result<Tensor>) -> Result<()> {
        let vars = self.vars.lock().unwrap();
        for (name, var) in vars.iter() {
            let value = value(name, var.dims())?;
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    fn next_u64(&self) -> u64 {
        // SplitMix64: tiny, fast and good enough for initial weights.
        let mut state = self.rng.lock().unwrap();
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}
