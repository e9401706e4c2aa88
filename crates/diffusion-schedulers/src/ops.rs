//! Tensor operations shared by the schedulers: per-batch coefficients, dynamic thresholding,
//! noise drawing, and the forward process.

use diffusion_core::burn::tensor::{DType, FloatDType, Tensor, TensorData};
use diffusion_core::{Error, NoiseSource, Result, randn_batch};

/// The float dtype of a tensor.
///
/// # Errors
/// [`Error::InvalidArgument`] for quantized tensors, which schedulers cannot step.
pub(crate) fn float_dtype<const D: usize>(t: &Tensor<D>, name: &str) -> Result<FloatDType> {
    match t.dtype() {
        d @ (DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16) => Ok(d.into()),
        other => Err(Error::invalid_argument(
            name,
            format!("expected a float tensor, got dtype {other:?}"),
        )),
    }
}

/// Check that two tensors have the same shape.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `name`.
pub(crate) fn check_same_shape<const D: usize>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    name: &str,
    reference: &str,
) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid_argument(
            name,
            format!(
                "has shape {:?} but {reference} has shape {:?}",
                a.dims(),
                b.dims()
            ),
        ));
    }
    Ok(())
}

/// A `[T, 1, ..., 1]` tensor of per-batch coefficients that broadcasts against `[B, ...]`
/// (`T` is `B` or 1), in `like`'s dtype and on its device.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `timesteps` when `T` is neither 1 nor the batch size.
pub(crate) fn batch_coefficients<const D: usize>(
    values: &[f64],
    like: &Tensor<D>,
) -> Result<Tensor<D>> {
    let batch = like.dims()[0];
    if values.len() != 1 && values.len() != batch {
        return Err(Error::invalid_argument(
            "timesteps",
            format!(
                "got {} timesteps for a batch of {batch}; pass one per sample or one for all",
                values.len()
            ),
        ));
    }
    let mut shape = [1usize; D];
    shape[0] = values.len();
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let dtype: DType = float_dtype(like, "sample")?.into();
    Ok(Tensor::from_data(
        TensorData::new(data, shape),
        (&like.device(), dtype),
    ))
}

/// A step coefficient: one float32 value for the whole batch, or one per sample as a
/// `[B, 1, ..., 1]` tensor from [`batch_coefficients`]. Lets a scheduler write its update once
/// for `step` (one timestep) and for batched steps with a timestep per sample.
pub(crate) trait Coefficient<const D: usize> {
    /// `x * c`.
    fn times(&self, x: Tensor<D>) -> Tensor<D>;
    /// `x / c`.
    fn divide(&self, x: Tensor<D>) -> Tensor<D>;
}

impl<const D: usize> Coefficient<D> for f32 {
    fn times(&self, x: Tensor<D>) -> Tensor<D> {
        x.mul_scalar(*self)
    }

    fn divide(&self, x: Tensor<D>) -> Tensor<D> {
        x.div_scalar(*self)
    }
}

impl<const D: usize> Coefficient<D> for Tensor<D> {
    fn times(&self, x: Tensor<D>) -> Tensor<D> {
        x.mul(self.clone())
    }

    fn divide(&self, x: Tensor<D>) -> Tensor<D> {
        x.div(self.clone())
    }
}

/// `sqrt(alpha_bar) * original + sqrt(1 - alpha_bar) * noise`, the forward process, with one
/// `alpha_bar` per batch element (or one for all). The coefficients are computed in float32
/// from the float32 `alpha_bar`, as diffusers computes them in the sample's dtype.
///
/// # Errors
/// As [`batch_coefficients`]; [`Error::InvalidArgument`] when `noise` is shaped differently.
pub(crate) fn add_noise_with<const D: usize>(
    alphas_bar: &[f64],
    original: Tensor<D>,
    noise: Tensor<D>,
) -> Result<Tensor<D>> {
    check_same_shape(&noise, &original, "noise", "original_samples")?;
    let (signal, noise_level) = forward_coefficients(alphas_bar);
    let signal = batch_coefficients(&signal, &original)?;
    let noise_level = batch_coefficients(&noise_level, &original)?;
    Ok(signal.mul(original).add(noise_level.mul(noise)))
}

/// `sqrt(alpha_bar)` and `sqrt(1 - alpha_bar)` in float32 (`1 - alpha_bar` rounds there for
/// `alpha_bar < 0.5`, as in diffusers).
fn forward_coefficients(alphas_bar: &[f64]) -> (Vec<f64>, Vec<f64>) {
    alphas_bar
        .iter()
        .map(|&a| {
            let a = a as f32;
            (f64::from(a.sqrt()), f64::from((1.0 - a).sqrt()))
        })
        .unzip()
}

/// `sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * sample`, the v-prediction target.
///
/// # Errors
/// As [`add_noise_with`].
pub(crate) fn velocity_with<const D: usize>(
    alphas_bar: &[f64],
    sample: Tensor<D>,
    noise: Tensor<D>,
) -> Result<Tensor<D>> {
    check_same_shape(&noise, &sample, "noise", "sample")?;
    let (signal, noise_level) = forward_coefficients(alphas_bar);
    let signal = batch_coefficients(&signal, &sample)?;
    let noise_level = batch_coefficients(&noise_level, &sample)?;
    Ok(signal.mul(noise).sub(noise_level.mul(sample)))
}

/// Noise shaped like `like`, from the caller's tensor or drawn from the generator exactly as
/// diffusers' `randn_tensor(like.shape, generator=...)` does on CPU.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `generator` when neither is given (diffusers would fall
/// back to torch's global generator; here randomness is always explicit) or both are, and
/// naming `variance_noise` when it is shaped differently from `like`.
pub(crate) fn noise_like<const D: usize>(
    like: &Tensor<D>,
    generator: Option<NoiseSource<'_>>,
    variance_noise: Option<Tensor<D>>,
    class: &str,
) -> Result<Tensor<D>> {
    match (generator, variance_noise) {
        (Some(_), Some(_)) => Err(Error::invalid_argument(
            "variance_noise",
            "pass either a generator or variance_noise, not both",
        )),
        (None, Some(noise)) => {
            check_same_shape(&noise, like, "variance_noise", "model_output")?;
            Ok(noise)
        }
        (Some(source), None) => {
            let shape = like.dims();
            let data = randn_batch(&shape, source)?;
            let dtype: DType = float_dtype(like, "model_output")?.into();
            Ok(Tensor::from_data(
                TensorData::new(data, shape),
                (&like.device(), dtype),
            ))
        }
        (None, None) => Err(Error::invalid_argument(
            "generator",
            format!(
                "{class} draws noise at this step; pass a generator (or variance_noise) in \
                 StepOptions"
            ),
        )),
    }
}

/// Dynamic thresholding of Imagen (diffusers' `_threshold_sample`): per batch element, take the
/// `ratio` quantile `s` of `|x|` over all other dimensions, clamp it to `[1, max_value]`, then
/// clamp `x` to `[-s, s]` and divide by `s`.
///
/// The quantile follows `torch.quantile`'s linear interpolation with its float32 rank
/// arithmetic; half-precision input is thresholded in float32 as in diffusers.
///
/// # Shapes
/// `sample`: `[B, C, ...]` with `D >= 2`; the result has the same shape.
///
/// # Errors
/// [`Error::InvalidArgument`] for a rank below 2 or an empty sample.
pub fn threshold_sample<const D: usize>(
    sample: Tensor<D>,
    ratio: f64,
    max_value: f64,
) -> Result<Tensor<D>> {
    let dims = sample.dims();
    if D < 2 {
        return Err(Error::invalid_argument(
            "sample",
            format!("thresholding needs a [batch, channels, ...] tensor, got shape {dims:?}"),
        ));
    }
    let batch = dims[0];
    let per_sample: usize = dims[1..].iter().product();
    if batch == 0 || per_sample == 0 {
        return Err(Error::invalid_argument(
            "sample",
            format!("cannot threshold an empty tensor of shape {dims:?}"),
        ));
    }
    let dtype = float_dtype(&sample, "sample")?;
    let upcast = !matches!(dtype, FloatDType::F32 | FloatDType::F64);
    let flat: Tensor<2> = if upcast {
        sample.cast(FloatDType::F32).reshape([batch, per_sample])
    } else {
        sample.reshape([batch, per_sample])
    };

    // torch.quantile: rank = q * (n - 1) in float32, then lerp between the two neighbours.
    let rank = (ratio as f32) * ((per_sample - 1) as f32);
    let below = (rank as usize).min(per_sample - 1);
    let above = (rank.ceil() as usize).min(per_sample - 1);
    let weight = rank - below as f32;
    let sorted = flat.clone().abs().sort(1);
    let lo = sorted.clone().narrow(1, below, 1);
    let hi = sorted.narrow(1, above, 1);
    // torch's scalar lerp switches formula at weight 0.5 for accuracy; follow it.
    let s = if weight.abs() < 0.5 {
        lo.clone().add(hi.sub(lo).mul_scalar(weight))
    } else {
        hi.clone().sub(hi.sub(lo).mul_scalar(1.0f32 - weight))
    };
    let s = s
        .clamp_min(1.0)
        .clamp_max(max_value)
        .expand([batch, per_sample]);
    let out = flat.max_pair(s.clone().neg()).min_pair(s.clone()).div(s);
    let out: Tensor<D> = out.reshape(dims);
    Ok(if upcast { out.cast(dtype) } else { out })
}

/// Clamp `x_0` to `[-range, range]` (`clip_sample`).
pub(crate) fn clip_sample<const D: usize>(sample: Tensor<D>, range: f64) -> Tensor<D> {
    sample.clamp(-range, range)
}

/// A model output kept for the multistep update, flattened so that the scheduler does not
/// depend on the tensor rank.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    flat: Tensor<1>,
    dims: Vec<usize>,
}

impl Stored {
    pub(crate) fn new<const D: usize>(t: &Tensor<D>) -> Self {
        let dims = t.dims().to_vec();
        let n: usize = dims.iter().product();
        Self {
            flat: t.clone().reshape([n]),
            dims,
        }
    }

    pub(crate) fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub(crate) fn get<const D: usize>(&self) -> Result<Tensor<D>> {
        let dims: [usize; D] = self.dims.as_slice().try_into().map_err(|_| {
            Error::invalid_argument(
                "sample",
                format!(
                    "rank changed between steps: {:?} before, {D} dimensions now",
                    self.dims
                ),
            )
        })?;
        Ok(self.flat.clone().reshape(dims))
    }
}

/// Shift a multistep history of `order` slots left and put `newest` last (diffusers'
/// `model_outputs` rotation).
pub(crate) fn push_history(history: &mut Vec<Option<Stored>>, order: usize, newest: Stored) {
    history.resize(order, None);
    history.rotate_left(1);
    history[order - 1] = Some(newest);
}

/// The newest `count` entries of a multistep history, oldest first.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `timestep` when one of them was never filled, or
/// `sample` when the rank changed.
pub(crate) fn history_tail<const D: usize>(
    history: &[Option<Stored>],
    count: usize,
) -> Result<Vec<Tensor<D>>> {
    history[history.len() - count..]
        .iter()
        .map(|s| match s {
            Some(s) => s.get::<D>(),
            None => Err(Error::invalid_argument(
                "timestep",
                "the multistep history is missing an earlier output",
            )),
        })
        .collect()
}
