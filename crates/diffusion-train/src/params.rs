//! A module's float parameters as a flat list, in the order burn's derive visits them.
//!
//! The optimizer, the EMA and the gradient clipping all work on "the i-th parameter": `visit`
//! and `map` of a `#[derive(Module)]` type walk fields in declaration order, so index `i` names the
//! same parameter in the model, its gradients and every shadow copy. Values are kept flattened to
//! rank 1 on the device without autodiff; [`replace`] reshapes them back.
//!
//! For files, a list is put back into a copy of the model ([`replace`]) and written with
//! diffusion-models' state-dict functions, so optimizer and EMA files use diffusers' keys and
//! PyTorch's layout.

use diffusion_core::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use diffusion_core::burn::tensor::{Gradients, Tensor};

/// Shape and trainability of one parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParamInfo {
    /// Shape in burn's layout.
    pub shape: Vec<usize>,
    /// Whether the parameter is trained (diffusers' `requires_grad`).
    pub trainable: bool,
}

struct InfoVisitor {
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for InfoVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(ParamInfo {
            shape: param.lazy_shape().to_vec(),
            trainable: param.is_require_grad(),
        });
    }
}

/// Shape and trainability of every float parameter, in visit order.
pub(crate) fn infos<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = InfoVisitor { out: Vec::new() };
    module.visit(&mut v);
    v.out
}

struct ValueVisitor {
    out: Vec<Tensor<1>>,
}

impl ModuleVisitor for ValueVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        self.out.push(value.reshape([n]));
    }
}

/// Every float parameter's value, flattened, without autodiff.
pub(crate) fn values<M: Module>(module: &M) -> Vec<Tensor<1>> {
    let mut v = ValueVisitor { out: Vec::new() };
    module.visit(&mut v);
    v.out
}

struct GradVisitor<'a> {
    grads: &'a mut Gradients,
    out: Vec<Option<Tensor<1>>>,
}

impl ModuleVisitor for GradVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = if param.is_require_grad() {
            param.val().grad_remove(self.grads).map(|g| {
                let n = g.shape().num_elements();
                g.reshape([n])
            })
        } else {
            None
        };
        self.out.push(grad);
    }
}

/// Every parameter's gradient, flattened; `None` for frozen parameters and for parameters the
/// loss does not depend on (torch leaves their `.grad` at `None`).
pub(crate) fn gradients<M: Module>(module: &M, grads: &mut Gradients) -> Vec<Option<Tensor<1>>> {
    let mut v = GradVisitor {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct Replace {
    values: Vec<Option<Tensor<1>>>,
    index: usize,
}

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let Some(new) = self.values.get_mut(i).and_then(Option::take) else {
            return param;
        };
        let (id, old, mapper) = param.consume();
        let mut value = new.reshape(old.dims());
        if old.is_autodiff() {
            // A fresh leaf carrying the old one's autodiff settings, as burn's optimizers do.
            let require_grad = old.is_require_grad();
            value = Tensor::from_inner(value);
            if let Some(strategy) = old.gradient_checkpointing_strategy() {
                value = value.with_gradient_checkpointing_strategy(strategy);
            }
            if require_grad {
                value = value.require_grad();
            }
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

/// `module` with parameter `i` set to `values[i]` (reshaped), keeping parameters whose entry is
/// `None`. On an autodiff device the new values become leaves with the old ones' settings.
///
/// # Panics
/// When a value's element count differs from its parameter's (a programming error: values are
/// always built from the same module's [`infos`]).
pub(crate) fn replace<M: Module>(module: M, values: Vec<Option<Tensor<1>>>) -> M {
    module.map(&mut Replace { values, index: 0 })
}

/// Number of elements of a shape.
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}
