//! The autodiff device of the training loops, with burn's gradient checkpointing on request.
//!
//! diffusers' scripts call `unet.enable_gradient_checkpointing()` under
//! `--gradient_checkpointing`, which recomputes each transformer/ResNet block's activations in
//! the backward pass. burn 0.22 checkpoints per operation instead, for the whole graph of an
//! autodiff device: with [`GradientCheckpointingStrategy::Balanced`] the outputs of operations
//! that burn marks memory-bound (element-wise ops, activations, normalisation pieces) are not
//! kept but recomputed from their inputs when backward needs them, while compute-bound ones
//! (matmul, convolution) keep their outputs. Every tensor of one graph must come from a device
//! with the same strategy (burn panics on a mix), so the loops build their autodiff device here,
//! create their inputs on it and give the trained modules its strategy with [`checkpointed`]
//! (burn's `fork` keeps a parameter's own autodiff association and `train` enables autodiff with
//! the default strategy, so a forked module would otherwise not checkpoint).
//!
//! [`GradientCheckpointingStrategy::Balanced`]: diffusion_core::burn::tensor::GradientCheckpointingStrategy

use diffusion_core::Device;
use diffusion_core::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use diffusion_core::burn::tensor::Tensor;

/// `device` with autodiff on and, when `gradient_checkpointing` is set, burn's balanced
/// gradient checkpointing. Without it, a device that already has autodiff keeps its strategy.
pub fn autodiff_device(device: &Device, gradient_checkpointing: bool) -> Device {
    let ad = device.clone().autodiff();
    if gradient_checkpointing {
        ad.gradient_checkpointing()
    } else {
        ad
    }
}

/// `module` with every autodiff float parameter carrying `device`'s gradient-checkpointing
/// strategy (a fresh leaf with the same values and gradient requirement). Parameters without
/// autodiff, and every parameter when `device` has no autodiff, are kept as they are.
pub fn checkpointed<M: Module>(module: M, device: &Device) -> M {
    match device.gradient_checkpointing_strategy() {
        Some(strategy) => module.map(&mut SetStrategy { strategy }),
        None => module,
    }
}

struct SetStrategy {
    strategy: diffusion_core::burn::tensor::GradientCheckpointingStrategy,
}

impl ModuleMapper for SetStrategy {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let value = param.val();
        if !value.is_autodiff() || value.gradient_checkpointing_strategy() == Some(self.strategy) {
            return param;
        }
        let (id, old, mapper) = param.consume();
        let require_grad = old.is_require_grad();
        let mut value = Tensor::from_inner(old.without_autodiff())
            .with_gradient_checkpointing_strategy(self.strategy);
        if require_grad {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Whether `module`'s trainable parameters run under burn's balanced gradient checkpointing
/// (what [`checkpointed`] gave them): replicas and copies of it made for other devices should
/// then checkpoint too.
pub fn is_checkpointed<M: Module>(module: &M) -> bool {
    let mut find = FindStrategy { balanced: None };
    module.visit(&mut find);
    find.balanced.unwrap_or(false)
}

struct FindStrategy {
    balanced: Option<bool>,
}

impl ModuleVisitor for FindStrategy {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.balanced.is_some() {
            return;
        }
        let value = param.val();
        if value.is_autodiff() && value.is_require_grad() {
            self.balanced = Some(
                value.gradient_checkpointing_strategy()
                    == Some(diffusion_core::burn::tensor::GradientCheckpointingStrategy::Balanced),
            );
        }
    }
}
