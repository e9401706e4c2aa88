//! LoRA against diffusers + peft (`fixtures/oracle/gen_lora.py`): the tiny SD 1 UNet and CLIP
//! text encoder of the model fixtures, adapter `a` in PEFT, kohya and older diffusers spelling,
//! adapter `b` in kohya spelling; outputs at several scales, two adapters weighted, fused,
//! unloaded, saved and reloaded, and the errors of a LoRA for another model. One test binary
//! with modules, because linking burn is slow.

mod errors;
mod formats;
mod parity;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::{CLIPTextModel, ModelMixin, UNet2DConditionModel, state_dict};

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// `fixtures/<relative>`.
pub fn fixtures(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(relative)
}

/// `fixtures/loaders/lora/<name>`.
pub fn lora_file(name: &str) -> PathBuf {
    fixtures("loaders/lora").join(name)
}

pub fn device() -> Device {
    Device::flex()
}

/// The base models: `unet2d_condition/sd1_tiny` and `text_encoders/clip_tiny`.
pub fn base_models() -> Result<(UNet2DConditionModel, CLIPTextModel)> {
    let unet =
        UNet2DConditionModel::from_pretrained(fixtures("unet2d_condition/sd1_tiny"), &device())?;
    let te = CLIPTextModel::from_pretrained(fixtures("text_encoders/clip_tiny"), &device())?;
    Ok((unet, te))
}

/// The oracle's inputs and outputs.
pub struct Io {
    source: WeightSource,
    path: PathBuf,
}

impl Io {
    pub fn open() -> Result<Self> {
        let path = lora_file("io.safetensors");
        Ok(Self {
            source: WeightSource::open(&path).with_context(|| path.display().to_string())?,
            path,
        })
    }

    pub fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        self.source
            .tensor::<D>(key, &device())
            .with_context(|| key.to_string())
    }

    /// An int64 `[B, S]` tensor.
    pub fn ids(&self, key: &str) -> Result<Tensor<2, Int>> {
        let bytes = std::fs::read(&self.path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let view = st.tensor(key).with_context(|| key.to_string())?;
        let shape = [view.shape()[0], view.shape()[1]];
        let data: Vec<i64> = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Tensor::from_data(TensorData::new(data, shape), &device()))
    }

    /// The UNet's and the text encoder's outputs on the oracle's inputs.
    pub fn run(
        &self,
        unet: &UNet2DConditionModel,
        te: &CLIPTextModel,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        let out = unet.forward(
            self.tensor("sample")?,
            self.tensor("timestep")?,
            self.tensor("encoder_hidden_states")?,
        )?;
        let hidden = te.forward(self.ids("input_ids")?)?.last_hidden_state;
        Ok((out, hidden))
    }

    /// Run both models and compare with the oracle's run `run`; returns the larger error.
    pub fn check(&self, run: &str, unet: &UNet2DConditionModel, te: &CLIPTextModel) -> Result<f32> {
        let (out, hidden) = self.run(unet, te)?;
        let a = assert_close(
            &format!("{run}/unet"),
            out,
            self.tensor(&format!("{run}/unet"))?,
        );
        let b = assert_close(
            &format!("{run}/text_encoder"),
            hidden,
            self.tensor(&format!("{run}/text_encoder"))?,
        );
        Ok(a.max(b))
    }
}

/// Largest absolute difference; fails on a shape mismatch or a non-finite value.
pub fn max_abs_diff<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (got, want) = (to_vec(got), to_vec(want));
    got.iter()
        .zip(&want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max)
}

/// Assert `got` is within [`TOLERANCE`] of `want`; returns the difference.
pub fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) -> f32 {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| = {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max |diff| {diff:e} > {TOLERANCE:e}"
    );
    diff
}

/// Assert two modules hold the same parameters under the same keys, bit for bit.
pub fn assert_same_parameters<M: diffusion_core::burn::module::Module>(what: &str, a: &M, b: &M) {
    let (a, b) = (state_dict(a), state_dict(b));
    assert_eq!(a.len(), b.len(), "{what}: parameter counts differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.key, y.key, "{what}: keys differ");
        assert_eq!(x.shape, y.shape, "{what}: `{}` shape", x.key);
        assert!(
            x.values
                .iter()
                .zip(&y.values)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: `{}` values differ",
            x.key
        );
    }
    eprintln!("{what}: {} parameters bit-equal", a.len());
}
