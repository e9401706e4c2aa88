//! IP-Adapter's decoupled cross-attention (diffusers' `IPAdapterAttnProcessor2_0`): next to the
//! text keys and values, each loaded adapter projects its image tokens with its own `to_k_ip` /
//! `to_v_ip`; the queries attend to them separately and the results, weighted by the adapter's
//! scale (and optionally masked to a region of the image), are added to the text attention's
//! result before `to_out`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::Linear;
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};

use super::{Attention, scaled_dot_product_attention};
use crate::layers;

/// The image key/value projections of one cross-attention layer, one pair per loaded adapter,
/// and the scale each adapter's image attention is weighted with.
#[derive(Module, Debug)]
pub struct IPAdapterAttnProcessor {
    /// `to_k_ip.<i>`: `cross_attention_dim → heads * dim_head`, no bias.
    pub to_k_ip: Vec<Linear>,
    /// `to_v_ip.<i>`: `cross_attention_dim → heads * dim_head`, no bias.
    pub to_v_ip: Vec<Linear>,
    /// Per adapter: one scale, or one per image when the adapter's images are masked
    /// (diffusers' `processor.scale`).
    #[module(skip)]
    scale: Vec<Vec<f32>>,
}

impl IPAdapterAttnProcessor {
    /// Projections for `num_adapters` adapters (random weights, scale 1), as diffusers builds
    /// them before loading a checkpoint.
    pub fn new(
        cross_attention_dim: usize,
        inner_dim: usize,
        num_adapters: usize,
        device: &Device,
    ) -> Self {
        let projection = || {
            let mut l = layers::linear(cross_attention_dim, inner_dim, device);
            l.bias = None;
            l
        };
        Self {
            to_k_ip: (0..num_adapters).map(|_| projection()).collect(),
            to_v_ip: (0..num_adapters).map(|_| projection()).collect(),
            scale: vec![vec![1.0]; num_adapters],
        }
    }

    /// A processor from loaded projections (one pair per adapter), every adapter at scale 1.
    pub fn from_projections(to_k_ip: Vec<Linear>, to_v_ip: Vec<Linear>) -> Self {
        let n = to_k_ip.len();
        Self {
            to_k_ip,
            to_v_ip,
            scale: vec![vec![1.0]; n],
        }
    }

    /// Number of adapters.
    pub fn num_adapters(&self) -> usize {
        self.to_k_ip.len()
    }

    /// The scale of each adapter (one value, or one per masked image).
    pub fn scale(&self) -> &[Vec<f32>] {
        &self.scale
    }

    /// Set the scale of adapter `index`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`scale`) for an adapter index out of range or an empty list.
    pub fn set_scale(&mut self, index: usize, scale: Vec<f32>) -> Result<()> {
        if scale.is_empty() {
            return Err(Error::invalid_argument("scale", "an empty list of scales"));
        }
        let n = self.scale.len();
        let slot = self.scale.get_mut(index).ok_or_else(|| {
            Error::invalid_argument(
                "scale",
                format!("adapter {index} does not exist ({n} are loaded)"),
            )
        })?;
        *slot = scale;
        Ok(())
    }

    /// Add the image attention of every adapter to `hidden` (`[B, S, heads * dim_head]`, the
    /// text attention's merged heads), for queries `q` (`[B, heads, S, dim_head]`).
    pub(crate) fn add_image_attention(
        &self,
        layer: &Attention,
        mut hidden: Tensor<3>,
        q: Tensor<4>,
        ip: &IPAdapterAttnInputs<'_>,
    ) -> Tensor<3> {
        let [b, s, _] = hidden.dims();
        let dtype = hidden.dtype();
        for (i, states) in ip.image_states.iter().enumerate() {
            let (Some(to_k), Some(to_v), Some(scale)) =
                (self.to_k_ip.get(i), self.to_v_ip.get(i), self.scale.get(i))
            else {
                break;
            };
            if scale.iter().all(|&s| s == 0.0) {
                continue;
            }
            let [_, n, t, c] = states.dims();
            let attend = |tokens: Tensor<3>| {
                let k = layer.split_heads(to_k.forward(tokens.clone()));
                let v = layer.split_heads(to_v.forward(tokens));
                layer.merge_heads(scaled_dot_product_attention(q.clone(), k, v, None))
            };
            match ip.masks.get(i).and_then(Option::as_ref) {
                Some(mask) => {
                    for j in 0..n {
                        let tokens = states.clone().narrow(1, j, 1).reshape([b, t, c]);
                        let attended = attend(tokens);
                        let weight = mask
                            .downsample(j, b, s, &hidden.device())
                            .cast(FloatDType::from(dtype));
                        let w = scale.get(j).copied().unwrap_or(scale[0]);
                        hidden = hidden.add(attended.mul(weight).mul_scalar(w));
                    }
                }
                None => {
                    let tokens = states.clone().reshape([b, n * t, c]);
                    hidden = hidden.add(attend(tokens).mul_scalar(scale[0]));
                }
            }
        }
        hidden
    }
}

/// What a cross-attention layer with an [`IPAdapterAttnProcessor`] needs per forward pass.
#[derive(Clone, Copy, Debug)]
pub struct IPAdapterAttnInputs<'a> {
    /// Per adapter, the projected image tokens, `[B, num_images, tokens, cross_attention_dim]`
    /// (the UNet's image projection output).
    pub image_states: &'a [Tensor<4>],
    /// Per adapter, an optional mask (empty: no masks).
    pub masks: &'a [Option<IPAdapterMask>],
}

/// Where on the image an adapter's images act: one mask per image, values in `[0, 1]`
/// (diffusers' `IPAdapterMaskProcessor` output for one adapter, `[1, num_images, H, W]`).
/// Each attention layer resizes it to its own token grid with torch's bicubic interpolation,
/// as diffusers' `IPAdapterMaskProcessor.downsample` does; each (image, token count) is resized
/// once and reused by every layer of that size at every step.
#[derive(Clone, Debug)]
pub struct IPAdapterMask {
    data: Vec<f32>,
    num_images: usize,
    height: usize,
    width: usize,
    /// `(image, num_queries)` → the resized, padded row (shared by clones).
    resized: Arc<Mutex<ResizedRows>>,
}

/// `(image, num_queries)` → a mask resized to that token grid.
type ResizedRows = HashMap<(usize, usize), Arc<Vec<f32>>>;

impl PartialEq for IPAdapterMask {
    fn eq(&self, other: &Self) -> bool {
        (self.num_images, self.height, self.width, &self.data)
            == (other.num_images, other.height, other.width, &other.data)
    }
}

impl IPAdapterMask {
    /// A mask from `num_images` row-major `height x width` planes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`ip_adapter_masks`) when the sizes do not match the data or
    /// are zero.
    pub fn new(data: Vec<f32>, num_images: usize, height: usize, width: usize) -> Result<Self> {
        if num_images == 0 || height == 0 || width == 0 {
            return Err(Error::invalid_argument(
                "ip_adapter_masks",
                format!("empty mask ({num_images} images of {height}x{width})"),
            ));
        }
        if data.len() != num_images * height * width {
            return Err(Error::invalid_argument(
                "ip_adapter_masks",
                format!(
                    "{} values for {num_images} masks of {height}x{width}",
                    data.len()
                ),
            ));
        }
        Ok(Self {
            data,
            num_images,
            height,
            width,
            resized: Arc::default(),
        })
    }

    /// A mask from a `[1, num_images, H, W]` tensor (what diffusers' pipelines take).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`ip_adapter_masks`) for a first dimension other than 1.
    pub fn from_tensor(mask: Tensor<4>) -> Result<Self> {
        let [one, n, h, w] = mask.dims();
        if one != 1 {
            return Err(Error::invalid_argument(
                "ip_adapter_masks",
                format!(
                    "each adapter's masks must be [1, num_images, H, W], got [{one}, {n}, {h}, {w}]"
                ),
            ));
        }
        Self::new(diffusion_core::tensor::to_vec(mask), n, h, w)
    }

    /// Number of masked images.
    pub fn num_images(&self) -> usize {
        self.num_images
    }

    /// `(height, width)` of each plane.
    pub fn size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Mask `image` resized to the token grid of a layer with `num_queries` tokens, as a
    /// `[batch, num_queries, 1]` weight (diffusers' `IPAdapterMaskProcessor.downsample`: grid
    /// height from the mask's aspect ratio, bicubic interpolation, zero padding or truncation
    /// when the grid does not cover exactly `num_queries` tokens).
    pub fn downsample(
        &self,
        image: usize,
        batch: usize,
        num_queries: usize,
        device: &Device,
    ) -> Tensor<3> {
        let (mask_h, mask_w) = token_grid(self.height, self.width, num_queries);
        let row = {
            let mut cache = self.resized.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(cache.entry((image, num_queries)).or_insert_with(|| {
                let n = self.height * self.width;
                let plane = &self.data[image * n..][..n];
                let mut row = bicubic_resize(plane, self.height, self.width, mask_h, mask_w);
                row.resize(num_queries, 0.0);
                Arc::new(row)
            }))
        };
        let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [batch, num_queries, 1]), device)
    }
}

/// The token grid diffusers assumes for `num_queries` tokens of an image with the mask's aspect
/// ratio: `h = ceil-ish(sqrt(n / ratio))`, `w = n // h`.
fn token_grid(height: usize, width: usize, num_queries: usize) -> (usize, usize) {
    let ratio = width as f64 / height as f64;
    let mut mask_h = (num_queries as f64 / ratio).sqrt() as usize;
    mask_h = mask_h.max(1);
    if !num_queries.is_multiple_of(mask_h) {
        mask_h += 1;
    }
    (mask_h, (num_queries / mask_h).max(1))
}

/// torch's `F.interpolate(mode="bicubic", align_corners=False)` of one plane (Keys' cubic with
/// `A = -0.75`, edge samples repeated), in f32 as torch computes it for f32 inputs.
fn bicubic_resize(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    let conv1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let coefficients = |t: f32| [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)];
    let taps = |dst: usize, in_size: usize, out_size: usize| {
        let scale = in_size as f32 / out_size as f32;
        let real = scale * (dst as f32 + 0.5) - 0.5;
        let base = real.floor();
        let t = real - base;
        let base = base as i64;
        let idx: [usize; 4] =
            std::array::from_fn(|k| (base - 1 + k as i64).clamp(0, in_size as i64 - 1) as usize);
        (idx, coefficients(t))
    };
    let mut out = Vec::with_capacity(out_h * out_w);
    for oy in 0..out_h {
        let (ys, wy) = taps(oy, h, out_h);
        for ox in 0..out_w {
            let (xs, wx) = taps(ox, w, out_w);
            let rows: [f32; 4] = std::array::from_fn(|r| {
                let line = &src[ys[r] * w..][..w];
                line[xs[0]] * wx[0]
                    + line[xs[1]] * wx[1]
                    + line[xs[2]] * wx[2]
                    + line[xs[3]] * wx[3]
            });
            out.push(rows[0] * wy[0] + rows[1] * wy[1] + rows[2] * wy[2] + rows[3] * wy[3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_grid_follows_diffusers() {
        // 32x32 mask, 8x8 latent tokens.
        assert_eq!(token_grid(32, 32, 64), (8, 8));
        // 16 tokens (4x4) of a square image.
        assert_eq!(token_grid(512, 512, 16), (4, 4));
        // A 2:1 mask over 4096 tokens: h = sqrt(2048) = 45 -> 46 (4096 % 45 != 0), w = 89.
        assert_eq!(token_grid(256, 512, 4096), (46, 89));
    }

    #[test]
    fn bicubic_matches_torch() {
        // torch: F.interpolate(arange(64).reshape(1, 1, 8, 8) ** 1.5 / 1000, size=(3, 5),
        // mode="bicubic"), values in a mask's range; f32 agrees to a few ulps (1e-6).
        let src: Vec<f32> = (0..64).map(|v| (v as f32).powf(1.5) / 1000.0).collect();
        let want: [f32; 15] = [
            0.016_639_143,
            0.023_031_848,
            0.030_235_736,
            0.038_142_875,
            0.046_640_046,
            0.149_425_61,
            0.162_632_36,
            0.176_234_66,
            0.190_207_44,
            0.204_493_88,
            0.354_338_74,
            0.371_800_04,
            0.389_580_16,
            0.407_646,
            0.425_939_95,
        ];
        for (got, want) in bicubic_resize(&src, 8, 8, 3, 5).iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn bicubic_identity_and_constant() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(bicubic_resize(&src, 4, 4, 4, 4), src);
        let ones = vec![1.0; 64];
        for v in bicubic_resize(&ones, 8, 8, 3, 5) {
            assert!((v - 1.0).abs() < 1e-6);
        }
    }
}
