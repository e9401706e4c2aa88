//! Writing merged weights `W = W0 + Σ coef · up · down` into a model's parameters, keeping the
//! originals `W0` so that any later set of adapters (or none) is computed from them.

use std::collections::{BTreeMap, HashMap};

use diffusion_core::burn::module::Param;
use diffusion_core::burn::tensor::Tensor;
use diffusion_models::state_dict::KeyedParamMapper;

/// Sets the parameters named in `targets`: `None` restores the original, `Some(delta)` (PyTorch
/// layout, flattened to `[rows, columns]`) sets original + delta. Originals are recorded the
/// first time a parameter is touched.
pub(crate) struct Merger<'a> {
    pub targets: &'a BTreeMap<String, Option<Tensor<2>>>,
    pub originals: &'a mut HashMap<String, Tensor<1>>,
}

impl KeyedParamMapper for Merger<'_> {
    fn map_param<const D: usize>(
        &mut self,
        key: &str,
        transposed: bool,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        let Some(target) = self.targets.get(key) else {
            return param;
        };
        param.map(|current| {
            let dims = current.dims();
            let count = dims.iter().product::<usize>();
            let original = self
                .originals
                .entry(key.to_string())
                .or_insert_with(|| current.reshape([count]))
                .clone()
                .reshape(dims);
            match target {
                None => original,
                Some(delta) => {
                    let mut delta = if transposed {
                        delta.clone().transpose()
                    } else {
                        delta.clone()
                    };
                    // Factors are read as the device's default float; a half-precision model
                    // gets its sum in its own dtype.
                    if delta.dtype() != original.dtype() {
                        delta = delta.cast(original.dtype());
                    }
                    original + delta.reshape(dims)
                }
            }
        })
    }
}
