//! `AutoencoderKL`: the KL-regularised VAE of Stable Diffusion, SDXL, SD3 and Flux
//! (`diffusers.models.autoencoders.autoencoder_kl`).

mod config;
mod tiling;

pub use config::AutoencoderKLConfig;
pub use tiling::{blend_h, blend_v};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Error, NoiseSource, Result};

use crate::activations::Activation;
use crate::autoencoders::vae::{CoderConfig, Decoder, DiagonalGaussianDistribution, Encoder};
use crate::layers;
use crate::modeling_utils::ModelMixin;

/// diffusers' default `tile_overlap_factor`.
pub const DEFAULT_TILE_OVERLAP_FACTOR: f64 = 0.25;

/// Memory-saving modes and tile geometry (the non-config attributes of diffusers' model).
#[derive(Clone, Copy, Debug, PartialEq)]
struct RunOptions {
    use_slicing: bool,
    use_tiling: bool,
    tile_sample_min_size: usize,
    tile_latent_min_size: usize,
    tile_overlap_factor: f64,
}

/// The geometry of one tiled pass, derived as diffusers derives it.
struct TilePlan {
    /// Tile side in the input (`tile_*_min_size` of the input space).
    size: usize,
    /// Distance between tile starts in the input.
    step: usize,
    /// Rows / columns blended between neighbouring outputs.
    blend_extent: usize,
    /// Side each output tile is cropped to.
    row_limit: usize,
}

impl TilePlan {
    /// `input_size` tiles the input, `output_size` is the matching output tile side.
    fn new(input_size: usize, output_size: usize, factor: f64, field: &str) -> Result<Self> {
        let step = (input_size as f64 * (1.0 - factor)) as usize;
        let blend_extent = (output_size as f64 * factor) as usize;
        if step == 0 || blend_extent >= output_size {
            return Err(Error::invalid_argument(
                field,
                format!(
                    "tiles of {input_size} (output {output_size}) with overlap factor {factor} \
                     do not advance; use larger tiles or a smaller overlap"
                ),
            ));
        }
        Ok(Self {
            size: input_size,
            step,
            blend_extent,
            row_limit: output_size - blend_extent,
        })
    }
}

/// diffusers' `AutoencoderKL`: attribute names equal its state-dict keys.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// Image to moments (`double_z`).
    pub encoder: Encoder,
    /// Latents to image.
    pub decoder: Decoder,
    /// 1×1 convolution on the moments (`use_quant_conv`).
    pub quant_conv: Option<Conv2d>,
    /// 1×1 convolution on the latents (`use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d>,
    #[module(skip)]
    config: AutoencoderKLConfig,
    #[module(skip)]
    options: RunOptions,
}

impl AutoencoderKL {
    /// Build a model with freshly initialised (lazy) parameters; slicing and tiling are off.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for inconsistent configs (block list lengths, group counts that
    /// do not divide channels, ...), [`Error::Unsupported`] for block types or activations this
    /// port does not implement. Paths in these errors read `<in-memory config>`;
    /// [`Self::from_pretrained`] reports the `config.json` instead.
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Result<Self> {
        use diffusion_core::Config as _;
        config
            .validate()
            .map_err(|(field, message)| layers::config_error(&field, message))?;
        let act_fn = Activation::from_name(&config.act_fn).ok_or_else(|| {
            layers::unsupported(
                "act_fn",
                &config.act_fn,
                format!("supported: {}", Activation::NAMES.join(", ")),
            )
        })?;
        let coder = |in_channels, out_channels, block_types: &[String], double_z| CoderConfig {
            in_channels,
            out_channels,
            block_types: block_types.to_vec(),
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            norm_num_groups: config.norm_num_groups,
            act_fn,
            double_z,
            mid_block_add_attention: config.mid_block_add_attention,
        };
        let latent = config.latent_channels;
        let encoder = Encoder::new(
            &coder(config.in_channels, latent, &config.down_block_types, true),
            device,
        )?;
        let decoder = Decoder::new(
            &coder(latent, config.out_channels, &config.up_block_types, false),
            device,
        )?;
        let sample_side = config.sample_side();
        let options = RunOptions {
            use_slicing: false,
            use_tiling: false,
            tile_sample_min_size: sample_side,
            tile_latent_min_size: (sample_side as f64
                / 2f64.powi(config.num_downsamplings() as i32))
                as usize,
            tile_overlap_factor: DEFAULT_TILE_OVERLAP_FACTOR,
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: config
                .use_quant_conv
                .then(|| layers::conv2d(2 * latent, 2 * latent, 1, 1, 0, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| layers::conv2d(latent, latent, 1, 1, 0, device)),
            config: config.clone(),
            options,
        })
    }

    /// Encode and decode one image of the batch at a time (`enable_slicing`).
    pub fn enable_slicing(&mut self) {
        self.options.use_slicing = true;
    }

    /// Process the whole batch at once again.
    pub fn disable_slicing(&mut self) {
        self.options.use_slicing = false;
    }

    /// Whether slicing is on.
    pub fn use_slicing(&self) -> bool {
        self.options.use_slicing
    }

    /// Split inputs larger than a tile into overlapping tiles and blend the results
    /// (`enable_tiling`); memory then stays bounded by the tile size. The output differs from
    /// untiled processing near tile seams, as in diffusers.
    pub fn enable_tiling(&mut self) {
        self.options.use_tiling = true;
    }

    /// Process inputs in one piece again.
    pub fn disable_tiling(&mut self) {
        self.options.use_tiling = false;
    }

    /// Whether tiling is on.
    pub fn use_tiling(&self) -> bool {
        self.options.use_tiling
    }

    /// Image tile side (`tile_sample_min_size`; default: `sample_size`).
    pub fn tile_sample_min_size(&self) -> usize {
        self.options.tile_sample_min_size
    }

    /// Latent tile side (`tile_latent_min_size`; default:
    /// `int(sample_size / 2^(len(block_out_channels) - 1))`).
    pub fn tile_latent_min_size(&self) -> usize {
        self.options.tile_latent_min_size
    }

    /// Fraction of a tile that overlaps its neighbour (`tile_overlap_factor`, default 0.25).
    pub fn tile_overlap_factor(&self) -> f64 {
        self.options.tile_overlap_factor
    }

    /// Set `tile_sample_min_size` and `tile_latent_min_size` (diffusers users assign the
    /// attributes); the latent size should be the image size divided by the downsampling.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the size whose tiles would not advance with the
    /// current overlap factor (including 0).
    pub fn set_tile_sizes(&mut self, sample_min_size: usize, latent_min_size: usize) -> Result<()> {
        let factor = self.options.tile_overlap_factor;
        TilePlan::new(
            sample_min_size,
            latent_min_size,
            factor,
            "tile_sample_min_size",
        )?;
        TilePlan::new(
            latent_min_size,
            sample_min_size,
            factor,
            "tile_latent_min_size",
        )?;
        self.options.tile_sample_min_size = sample_min_size;
        self.options.tile_latent_min_size = latent_min_size;
        Ok(())
    }

    /// Set `tile_overlap_factor`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`tile_overlap_factor`) outside `[0, 1)` or when tiles of the
    /// current sizes would not advance.
    pub fn set_tile_overlap_factor(&mut self, factor: f64) -> Result<()> {
        if !(0.0..1.0).contains(&factor) {
            return Err(Error::invalid_argument(
                "tile_overlap_factor",
                format!("{factor} is not in [0, 1)"),
            ));
        }
        let (s, l) = (
            self.options.tile_sample_min_size,
            self.options.tile_latent_min_size,
        );
        TilePlan::new(s, l, factor, "tile_overlap_factor")?;
        TilePlan::new(l, s, factor, "tile_overlap_factor")?;
        self.options.tile_overlap_factor = factor;
        Ok(())
    }

    /// Encode images into the posterior over latents, one image at a time with slicing and in
    /// tiles with tiling (for images larger than a tile).
    ///
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`; each side must stay at least 2 before every
    ///   downsampling (no further constraint: odd sides are floored as in diffusers)
    /// - output: a distribution over `[B, latent_channels, h, w]` with
    ///   `h = H / 2^(n-1)` for sides that are multiples of it
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`sample`) for the wrong channel count or dtype, an empty
    /// batch, a side too small to downsample (also for a tile at the image border), and
    /// (`tile_*`) for tile sizes that do not advance.
    pub fn encode(&self, x: Tensor<4>) -> Result<DiagonalGaussianDistribution> {
        self.check_input(&x, "sample", self.config.in_channels)?;
        let batch = x.dims()[0];
        let moments = if self.options.use_slicing && batch > 1 {
            let parts = x
                .split(1, 0)
                .into_iter()
                .map(|slice| self.encode_moments(slice))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(parts, 0)
        } else {
            self.encode_moments(x)?
        };
        DiagonalGaussianDistribution::new(moments, false)
    }

    /// Decode latents into images, one at a time with slicing and in tiles with tiling (for
    /// latents larger than a tile).
    ///
    /// The latents are used as given: undo `scaling_factor` / `shift_factor` first
    /// (`z / scaling_factor + shift_factor`) when they come from a diffusion model.
    ///
    /// # Shapes
    /// - `z`: `[B, latent_channels, h, w]`
    /// - output: `[B, out_channels, h * 2^(n-1), w * 2^(n-1)]` (tiling crops and blends, so
    ///   tiled outputs can be smaller when the latent sides are not a whole number of tiles)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`z`) for the wrong channel count or dtype or an empty
    /// tensor, (`tile_*`) for tile sizes that do not advance.
    pub fn decode(&self, z: Tensor<4>) -> Result<Tensor<4>> {
        self.check_input(&z, "z", self.config.latent_channels)?;
        let batch = z.dims()[0];
        if self.options.use_slicing && batch > 1 {
            let parts = z
                .split(1, 0)
                .into_iter()
                .map(|slice| self.decode_one(slice))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(parts, 0))
        } else {
            self.decode_one(z)
        }
    }

    /// Encode `sample`, take the posterior's mode (or a sample drawn with `generator` when
    /// `sample_posterior`) and decode it.
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]`
    /// - output: `[B, out_channels, H', W']` (`H' = H` when `H` is a multiple of
    ///   `2^(n-1)`)
    ///
    /// # Errors
    /// As [`Self::encode`], and [`Error::InvalidArgument`] (`generator`) for a per-image
    /// generator list that does not match the batch.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        sample_posterior: bool,
        generator: Option<NoiseSource<'_>>,
    ) -> Result<Tensor<4>> {
        let posterior = self.encode(sample)?;
        let z = if sample_posterior {
            posterior.sample(generator)?
        } else {
            posterior.mode()
        };
        self.decode(z)
    }

    /// Encode in overlapping tiles of `tile_sample_min_size`, whatever the image size
    /// (diffusers' `tiled_encode`).
    ///
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`
    /// - output: a distribution over `[B, latent_channels, h, w]`, each side the sum of the
    ///   cropped tile sides
    ///
    /// # Errors
    /// As [`Self::encode`].
    pub fn tiled_encode(&self, x: Tensor<4>) -> Result<DiagonalGaussianDistribution> {
        self.check_input(&x, "sample", self.config.in_channels)?;
        DiagonalGaussianDistribution::new(self.tiled_moments(x)?, false)
    }

    /// Decode in overlapping tiles of `tile_latent_min_size`, whatever the latent size
    /// (diffusers' `tiled_decode`).
    ///
    /// # Shapes
    /// - `z`: `[B, latent_channels, h, w]`
    /// - output: `[B, out_channels, H, W]`, each side the sum of the cropped tile sides
    ///
    /// # Errors
    /// As [`Self::decode`].
    pub fn tiled_decode(&self, z: Tensor<4>) -> Result<Tensor<4>> {
        self.check_input(&z, "z", self.config.latent_channels)?;
        self.tiled_pixels(z)
    }

    /// diffusers' `_encode`: moments of a batch, tiled when it is larger than a tile.
    fn encode_moments(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        let [_, _, h, w] = x.dims();
        let tile = self.options.tile_sample_min_size;
        if self.options.use_tiling && (h > tile || w > tile) {
            return self.tiled_moments(x);
        }
        self.check_encodable(h, w, None)?;
        Ok(self.encode_tile(x))
    }

    fn encode_tile(&self, x: Tensor<4>) -> Tensor<4> {
        let moments = self.encoder.forward(x);
        match &self.quant_conv {
            Some(conv) => layers::conv(conv, moments),
            None => moments,
        }
    }

    /// diffusers' `_decode`: one batch, tiled when it is larger than a tile.
    fn decode_one(&self, z: Tensor<4>) -> Result<Tensor<4>> {
        let [_, _, h, w] = z.dims();
        let tile = self.options.tile_latent_min_size;
        if self.options.use_tiling && (h > tile || w > tile) {
            return self.tiled_pixels(z);
        }
        Ok(self.decode_tile(z))
    }

    fn decode_tile(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => layers::conv(conv, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    fn tiled_moments(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        let o = self.options;
        let plan = TilePlan::new(
            o.tile_sample_min_size,
            o.tile_latent_min_size,
            o.tile_overlap_factor,
            "tile_sample_min_size",
        )?;
        let [b, c, h, w] = x.dims();
        let mut rows = Vec::new();
        for i in tiling::tile_starts(h, plan.step) {
            let mut row = Vec::new();
            for j in tiling::tile_starts(w, plan.step) {
                let (th, tw) = ((h - i).min(plan.size), (w - j).min(plan.size));
                self.check_encodable(th, tw, Some((i, j)))?;
                let tile = x.clone().slice([0..b, 0..c, i..i + th, j..j + tw]);
                row.push(self.encode_tile(tile));
            }
            rows.push(row);
        }
        Ok(tiling::stitch(rows, plan.blend_extent, plan.row_limit))
    }

    fn tiled_pixels(&self, z: Tensor<4>) -> Result<Tensor<4>> {
        let o = self.options;
        let plan = TilePlan::new(
            o.tile_latent_min_size,
            o.tile_sample_min_size,
            o.tile_overlap_factor,
            "tile_latent_min_size",
        )?;
        let [b, c, h, w] = z.dims();
        let mut rows = Vec::new();
        for i in tiling::tile_starts(h, plan.step) {
            let mut row = Vec::new();
            for j in tiling::tile_starts(w, plan.step) {
                let (th, tw) = ((h - i).min(plan.size), (w - j).min(plan.size));
                let tile = z.clone().slice([0..b, 0..c, i..i + th, j..j + tw]);
                row.push(self.decode_tile(tile));
            }
            rows.push(row);
        }
        Ok(tiling::stitch(rows, plan.blend_extent, plan.row_limit))
    }

    /// Channels, emptiness and dtype of an input named `name`.
    fn check_input(&self, x: &Tensor<4>, name: &str, channels: usize) -> Result<()> {
        let [b, c, h, w] = x.dims();
        if c != channels {
            return Err(Error::invalid_argument(
                name,
                format!("has {c} channels, the model takes {channels}"),
            ));
        }
        if b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid_argument(
                name,
                format!("shape [{b}, {c}, {h}, {w}] is empty"),
            ));
        }
        let weight_dtype = self.encoder.conv_in.weight.val().dtype();
        if x.dtype() != weight_dtype {
            return Err(Error::invalid_argument(
                name,
                format!(
                    "dtype {:?} differs from the model's {weight_dtype:?}; cast one of them",
                    x.dtype()
                ),
            ));
        }
        Ok(())
    }

    /// Every downsampling (a stride-2 3×3 convolution after padding one row and column) needs
    /// a side of at least 2.
    fn check_encodable(&self, h: usize, w: usize, tile_at: Option<(usize, usize)>) -> Result<()> {
        let (mut sh, mut sw) = (h, w);
        for _ in 0..self.config.num_downsamplings() {
            if sh < 2 || sw < 2 {
                let what = match tile_at {
                    Some((i, j)) => format!(
                        "tiling cuts a {h}x{w} tile at ({i}, {j}), which is too small for the \
                         encoder's {} downsamplings; change the image or tile size",
                        self.config.num_downsamplings()
                    ),
                    None => format!(
                        "{h}x{w} is too small for the encoder's {} downsamplings",
                        self.config.num_downsamplings()
                    ),
                };
                return Err(Error::invalid_argument("sample", what));
            }
            sh = (sh - 2) / 2 + 1;
            sw = (sw - 2) / 2 + 1;
        }
        Ok(())
    }
}

impl ModelMixin for AutoencoderKL {
    type Config = AutoencoderKLConfig;

    fn from_config(config: &AutoencoderKLConfig, device: &Device) -> Result<Self> {
        Self::new(config, device)
    }

    fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }
}
