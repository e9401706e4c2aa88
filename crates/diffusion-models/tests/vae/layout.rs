//! Convolution weights loaded channels-last (`kernels::ConvWeightLayout`), forced on flex, whose
//! own default keeps PyTorch's layout: the memory really is `[out, kh, kw, in]`, the values and
//! the decoded image are those of a PyTorch-layout load, and casting, re-laying out and loading
//! in f16 keep both.
//!
//! The layout is a process-wide setting, so one test sets it and restores it. Other tests of this
//! binary running meanwhile may load channels-last too; on flex that changes no value (the
//! convolution reads the weight contiguously either way).

use anyhow::Result;
use diffusion_core::burn::backend::Flex;
use diffusion_core::burn::module::{Module, ModuleVisitor, Param};
use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::kernels::{ConvWeightLayout, set_conv_weight_layout};
use diffusion_models::modeling_utils::{PretrainedOptions, to_dtype};
use diffusion_models::state_dict::{
    KeyedParamMapper, map_params_by_key, state_dict, with_loaded_layout,
};
use diffusion_models::{AutoencoderKL, ModelMixin};

use crate::{Io, device, fixture, load};

/// The shape and element strides of every rank-4 parameter (the VAE's convolution weights).
struct Strides(Vec<([usize; 4], Vec<isize>)>);

impl ModuleVisitor for Strides {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D != 4 {
            return;
        }
        let tensor = param.val();
        let dims = tensor.dims();
        let primitive = tensor
            .try_into_primitive::<Flex>()
            .expect("a tensor on the flex device");
        let shape = [dims[0], dims[1], dims[2], dims[3]];
        self.0.push((shape, primitive.layout().strides().to_vec()));
    }
}

/// Replaces every parameter with a new contiguous tensor of the same values.
struct Fresh;

impl KeyedParamMapper for Fresh {
    fn map_param<const D: usize>(
        &mut self,
        _key: &str,
        _transposed: bool,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        param.map(|t| Tensor::from_data(t.to_data(), &t.device()))
    }
}

fn strides(vae: &AutoencoderKL) -> Vec<([usize; 4], Vec<isize>)> {
    let mut visitor = Strides(Vec::new());
    vae.visit(&mut visitor);
    assert!(!visitor.0.is_empty(), "no convolution weights visited");
    visitor.0
}

/// Whether every convolution weight is a view of `[out, kh, kw, in]` memory (`channels_last`)
/// or contiguous `[out, in, kh, kw]`, checked on the 3×3 ones (a 1×1 weight is both).
fn assert_layout(what: &str, vae: &AutoencoderKL, channels_last: bool) {
    let mut checked = 0;
    for (shape @ [_, i, h, w], strides) in strides(vae) {
        if h * w == 1 {
            continue;
        }
        let (i, h, w) = (i as isize, h as isize, w as isize);
        let want = if channels_last {
            vec![h * w * i, 1, w * i, i]
        } else {
            vec![i * h * w, h * w, w, 1]
        };
        assert_eq!(strides, want, "{what}: weight {shape:?}");
        checked += 1;
    }
    assert!(checked > 0, "{what}: no 3×3 convolution weight");
}

fn assert_same_weights(what: &str, got: &AutoencoderKL, want: &AutoencoderKL) {
    let (got, want) = (state_dict(got), state_dict(want));
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.key, &g.shape), (&w.key, &w.shape), "{what}");
        assert!(g.values == w.values, "{what}: {} differs", g.key);
    }
}

#[test]
fn channels_last_conv_weights_load_cast_and_decode_like_pytorch_layout() -> Result<()> {
    let case = "sd_tiny";
    let io = Io::open(case)?;
    let z = io.tensor::<4>("z")?;

    set_conv_weight_layout(ConvWeightLayout::Pytorch);
    let plain = load(case)?;
    set_conv_weight_layout(ConvWeightLayout::ChannelsLast);
    let result = (|| -> Result<()> {
        assert_layout("pytorch", &plain, false);

        let last = load(case)?;
        assert_layout("channels-last load", &last, true);
        assert_same_weights("channels-last load", &last, &plain);
        let decoded = last.decode(z.clone())?;
        let want = plain.decode(z.clone())?;
        assert_eq!(decoded.to_data(), want.to_data(), "decode");
        crate::assert_close("channels-last decode", decoded, io.tensor("decode")?);

        // Casting keeps each layout; the cast values agree.
        let last_f16 = to_dtype(last.clone(), FloatDType::F16)?;
        assert_layout("channels-last cast", &last_f16, true);
        assert_same_weights(
            "cast",
            &last_f16,
            &to_dtype(plain.clone(), FloatDType::F16)?,
        );

        // Loading straight into f16 reorders the f16 bytes on the host.
        let options = PretrainedOptions {
            dtype: Some(FloatDType::F16),
            ..Default::default()
        };
        let (loaded_f16, _) =
            AutoencoderKL::from_pretrained_with(fixture(case), &options, &device())?;
        assert_layout("channels-last f16 load", &loaded_f16, true);
        assert_same_weights("f16 load", &loaded_f16, &last_f16);

        // A PyTorch-layout model re-laid out as loaded now is channels-last.
        let relaid = with_loaded_layout(plain.clone());
        assert_layout("re-laid out", &relaid, true);
        assert_same_weights("re-laid out", &relaid, &plain);

        // What a keyed mapper returns (here new, contiguous tensors, as a LoRA merge makes) is
        // laid out channels-last again.
        let remapped = map_params_by_key(last.clone(), &mut Fresh);
        assert_layout("mapped by key", &remapped, true);
        assert_same_weights("mapped by key", &remapped, &plain);
        Ok(())
    })();
    set_conv_weight_layout(ConvWeightLayout::Auto);
    result
}
