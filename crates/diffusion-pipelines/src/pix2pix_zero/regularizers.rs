//! The noise regularisers of Pix2Pix Zero's inversion: every inverse DDIM step pulls the noise
//! prediction towards i.i.d. standard normal noise with gradient steps on an auto-correlation
//! loss and a KL divergence (diffusers' `auto_corr_loss`, `kl_divergence`, `get_epsilon` and the
//! regularisation loop of `invert`). The gradients come from burn's autodiff, on the small
//! noise tensor only (the UNet is not involved).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::burn::tensor::module::avg_pool2d;
use diffusion_core::burn::tensor::ops::AvgPoolOptions;
use diffusion_core::{Error, Result, TorchGenerator};
use diffusion_schedulers::PredictionType;

/// The regulariser settings of [`super::Pix2PixZeroInvertArgs`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Regularization {
    pub lambda_auto_corr: f64,
    pub lambda_kl: f64,
    pub num_reg_steps: usize,
    pub num_auto_corr_rolls: usize,
}

/// diffusers' `get_epsilon`: the noise implied by a model output of `prediction_type` at a
/// timestep whose `alpha_bar` is `alpha_prod_t` (float32, as diffusers reads it from its
/// float32 `alphas_cumprod`).
///
/// # Errors
/// [`Error::InvalidArgument`] (`prediction_type`) for types other than epsilon, sample and
/// v-prediction.
pub(crate) fn get_epsilon(
    model_output: Tensor<4>,
    sample: &Tensor<4>,
    alpha_prod_t: f32,
    prediction_type: PredictionType,
) -> Result<Tensor<4>> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    match prediction_type {
        PredictionType::Epsilon => Ok(model_output),
        PredictionType::Sample => Ok(sample
            .clone()
            .sub(model_output.mul_scalar(alpha_prod_t.sqrt()))
            .div_scalar(beta_prod_t.sqrt())),
        PredictionType::VPrediction => Ok(model_output
            .mul_scalar(alpha_prod_t.sqrt())
            .add(sample.clone().mul_scalar(beta_prod_t.sqrt()))),
        other => Err(Error::invalid_argument(
            "prediction_type",
            format!(
                "{} must be one of `epsilon`, `sample` or `v_prediction` for Pix2Pix Zero's \
                 inversion",
                other.as_str()
            ),
        )),
    }
}

/// diffusers' `auto_corr_loss`: for every sample and channel, over a pyramid of 2x2 average
/// poolings down to 8 rows, the squared means of the map times itself rolled by a random
/// amount along the rows and along the columns. The roll amounts are
/// `torch.randint(rows // 2, (1,), generator=generator)`, one per level, drawn from
/// `generator` in diffusers' order.
///
/// # Errors
/// [`Error::InvalidArgument`] (`image`) for latents with fewer than 2 rows (torch cannot draw
/// from an empty range either).
pub(crate) fn auto_corr_loss(
    hidden_states: &Tensor<4>,
    generator: &mut TorchGenerator,
) -> Result<Tensor<1>> {
    let [b, c, _, _] = hidden_states.dims();
    let mut reg_loss: Option<Tensor<1>> = None;
    let mut add = |term: Tensor<1>| {
        reg_loss = Some(match reg_loss.take() {
            Some(acc) => acc.add(term),
            None => term,
        });
    };
    for i in 0..b {
        for j in 0..c {
            let mut noise = hidden_states.clone().narrow(0, i, 1).narrow(1, j, 1);
            loop {
                let rows = noise.dims()[2];
                let roll = generator.randint(0, (rows / 2) as i64).map_err(|_| {
                    Error::invalid_argument(
                        "image",
                        format!(
                            "latents of {rows} rows are too small for the auto-correlation \
                             regulariser (it rolls by a random amount below rows / 2)"
                        ),
                    )
                })?;
                for dim in [2, 3] {
                    let rolled = noise.clone().roll_dim(roll, dim);
                    add(noise.clone().mul(rolled).mean().powi_scalar(2));
                }
                if rows <= 8 {
                    break;
                }
                noise = avg_pool2d(noise, AvgPoolOptions::new([2, 2]));
            }
        }
    }
    reg_loss.ok_or_else(|| Error::invalid_argument("image", "empty latents"))
}

/// diffusers' `kl_divergence` of the values' mean and (unbiased) variance from a standard
/// normal: `var + mean^2 - 1 - log(var + 1e-7)`.
pub(crate) fn kl_divergence(hidden_states: &Tensor<4>) -> Tensor<1> {
    let n = hidden_states.shape().num_elements();
    let flat = hidden_states.clone().reshape([n]);
    let mean = flat.clone().mean();
    let var = flat
        .sub(mean.clone())
        .powi_scalar(2)
        .sum()
        .div_scalar((n.max(2) - 1) as f64);
    var.clone()
        .add(mean.powi_scalar(2))
        .sub_scalar(1.0)
        .sub(var.add_scalar(1e-7).log())
}

/// The gradient of `loss(get_epsilon(v))` with respect to `v` at `noise_pred` (a fresh leaf on
/// the autodiff device, as diffusers' `torch.autograd.Variable(noise_pred.detach())`).
fn gradient(
    noise_pred: &Tensor<4>,
    sample: &Tensor<4>,
    alpha_prod_t: f32,
    prediction_type: PredictionType,
    loss: impl FnOnce(&Tensor<4>) -> Result<Tensor<1>>,
) -> Result<Tensor<4>> {
    let var = noise_pred.clone().detach().autodiff().require_grad();
    let epsilon = get_epsilon(var.clone(), sample, alpha_prod_t, prediction_type)?;
    let grads = loss(&epsilon)?.backward();
    let grad = var
        .grad(&grads)
        .ok_or_else(|| Error::invalid_argument("noise_pred", "the regulariser has no gradient"))?;
    Ok(grad)
}

/// The regularisation loop of diffusers' `invert` on one step's (guided) noise prediction:
/// `num_reg_steps` times, `num_auto_corr_rolls` gradient steps of size
/// `lambda_auto_corr / num_auto_corr_rolls` on the auto-correlation loss, then one of size
/// `lambda_kl` on the KL divergence (each skipped when its lambda is 0).
///
/// # Shapes
/// - `noise_pred`: `[B, C, H, W]`; `sample` (the scaled model input, batched like the UNet
///   call: `[2B, C, H, W]` under guidance, as diffusers passes it): any shape that
///   broadcasts against `noise_pred` for the `sample` / `v_prediction` conversions.
///
/// # Errors
/// As [`get_epsilon`] and [`auto_corr_loss`].
pub(crate) fn regularize(
    mut noise_pred: Tensor<4>,
    sample: &Tensor<4>,
    alpha_prod_t: f32,
    prediction_type: PredictionType,
    reg: &Regularization,
    generator: &mut TorchGenerator,
) -> Result<Tensor<4>> {
    let device = noise_pred.device();
    let sample = sample.clone().to_device(&device);
    let (b, sample_b) = (noise_pred.dims()[0], sample.dims()[0]);
    if prediction_type != PredictionType::Epsilon && sample_b != b && b != 1 {
        // diffusers broadcasts the guided prediction against the doubled model input, which
        // only works for one image.
        return Err(Error::invalid_argument(
            "guidance_scale",
            format!(
                "the inversion regularisers with classifier-free guidance and a `{}` model \
                 take one image at a time, got {b}",
                prediction_type.as_str()
            ),
        ));
    }
    for _ in 0..reg.num_reg_steps {
        if reg.lambda_auto_corr > 0.0 {
            for _ in 0..reg.num_auto_corr_rolls {
                let grad = gradient(&noise_pred, &sample, alpha_prod_t, prediction_type, |e| {
                    auto_corr_loss(e, generator)
                })?;
                let grad = grad.div_scalar(reg.num_auto_corr_rolls as f64);
                noise_pred = noise_pred.sub(grad.mul_scalar(reg.lambda_auto_corr));
            }
        }
        if reg.lambda_kl > 0.0 {
            let grad = gradient(&noise_pred, &sample, alpha_prod_t, prediction_type, |e| {
                Ok(kl_divergence(e))
            })?;
            noise_pred = noise_pred.sub(grad.mul_scalar(reg.lambda_kl));
        }
    }
    Ok(noise_pred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::Device;
    use diffusion_core::burn::tensor::TensorData;
    use diffusion_core::tensor::to_vec;

    fn ramp(shape: [usize; 4], device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    #[test]
    fn kl_of_a_known_sample() {
        let device = Device::flex();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        // mean 2.5, unbiased var 5/3: 5/3 + 6.25 - 1 - ln(5/3 + 1e-7)
        let expected = 5.0f64 / 3.0 + 6.25 - 1.0 - (5.0f64 / 3.0 + 1e-7).ln();
        let got = to_vec(kl_divergence(&x))[0] as f64;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn auto_corr_gradient_matches_finite_differences() {
        let device = Device::flex();
        let x = ramp([1, 2, 16, 16], &device);
        let analytic = to_vec(
            gradient(&x, &x, 1.0, PredictionType::Epsilon, |e| {
                auto_corr_loss(e, &mut TorchGenerator::new(5))
            })
            .unwrap(),
        );
        let base = to_vec(x.clone());
        let loss_at = |values: Vec<f32>| -> f64 {
            let t = Tensor::<4>::from_data(TensorData::new(values, [1, 2, 16, 16]), &device);
            to_vec(auto_corr_loss(&t, &mut TorchGenerator::new(5)).unwrap())[0] as f64
        };
        for k in [0usize, 17, 300, 511] {
            let h = 1e-2f32;
            let mut plus = base.clone();
            plus[k] += h;
            let mut minus = base.clone();
            minus[k] -= h;
            let numeric = (loss_at(plus) - loss_at(minus)) / (2.0 * h as f64);
            assert!(
                (numeric - analytic[k] as f64).abs() < 1e-4 + 1e-2 * numeric.abs(),
                "{k}: {numeric} vs {}",
                analytic[k]
            );
        }
    }

    #[test]
    fn tiny_latents_are_an_error_not_a_panic() {
        let device = Device::flex();
        let x = ramp([1, 1, 1, 4], &device);
        let err = auto_corr_loss(&x, &mut TorchGenerator::new(0)).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }
}
