//! Pix2Pix Zero's cross-attention bookkeeping (diffusers' `Pix2PixZeroAttnProcessor` and
//! `Pix2PixZeroL2Loss`), as an [`AttentionHook`]: in the reference pass it records the
//! attention probabilities of every cross-attention layer (`attn2`) per timestep; in the guided
//! pass it sums, over those layers, the squared distance of the new probabilities to the
//! recorded ones, the loss whose gradient moves the latents.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Error, Result};
use diffusion_models::attention_processor::{Attention, AttentionHook};

/// What the hook does on the next UNet call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Nothing: the fused attention kernel runs.
    Off,
    /// Record each cross-attention layer's probabilities under this timestep.
    Record(u64),
    /// Add each layer's distance to the probabilities recorded under this timestep to the loss
    /// (and forget them, as diffusers pops them).
    Loss(u64),
}

#[derive(Debug)]
struct State {
    mode: Mode,
    /// Host copies (diffusers keeps them on the CPU too), by layer path and timestep.
    reference: HashMap<(String, u64), TensorData>,
    loss: Option<Tensor<1>>,
    /// The first thing that went wrong inside a forward pass (hooks cannot return errors).
    error: Option<Error>,
}

/// The hook installed on the pipeline's UNet for the duration of a call.
#[derive(Debug)]
pub(crate) struct CrossAttentionMaps {
    state: Mutex<State>,
}

fn key(timestep: f64) -> u64 {
    timestep.to_bits()
}

impl CrossAttentionMaps {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                mode: Mode::Off,
                reference: HashMap::new(),
                loss: None,
                error: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the maps of the next UNet call under `timestep`.
    pub fn record(&self, timestep: f64) {
        self.state().mode = Mode::Record(key(timestep));
    }

    /// Compute the loss against the maps recorded under `timestep` in the next UNet call.
    pub fn compute_loss(&self, timestep: f64) {
        let mut state = self.state();
        state.mode = Mode::Loss(key(timestep));
        state.loss = None;
    }

    /// Stop recording or computing losses.
    pub fn off(&self) {
        self.state().mode = Mode::Off;
    }

    /// The loss accumulated by the last [`Self::compute_loss`] pass, and turn the hook off.
    ///
    /// # Errors
    /// What went wrong during the pass (a layer without a recorded map); an
    /// [`Error::InvalidArgument`] (`unet`) when no cross-attention layer was seen.
    pub fn take_loss(&self) -> Result<Tensor<1>> {
        let mut state = self.state();
        state.mode = Mode::Off;
        if let Some(e) = state.error.take() {
            return Err(e);
        }
        state.loss.take().ok_or_else(|| {
            Error::invalid_argument(
                "unet",
                "the UNet has no cross-attention layers: Pix2Pix Zero's cross-attention \
                 guidance needs them",
            )
        })
    }

    /// The error recorded during the last pass, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.state().error.take()
    }
}

fn is_cross_attention(layer: &Attention) -> bool {
    // diffusers' `prepare_unet` picks the processors whose name contains "attn2".
    layer.path().contains("attn2")
}

impl AttentionHook for CrossAttentionMaps {
    fn wants_probabilities(&self, layer: &Attention) -> bool {
        is_cross_attention(layer) && self.state().mode != Mode::Off
    }

    fn probabilities(&self, layer: &Attention, probabilities: Tensor<4>) -> Tensor<4> {
        let mut state = self.state();
        match state.mode {
            Mode::Off => {}
            Mode::Record(t) => {
                let data = probabilities.clone().detach().into_data();
                state.reference.insert((layer.path().to_string(), t), data);
            }
            Mode::Loss(t) => match state.reference.remove(&(layer.path().to_string(), t)) {
                Some(data) => {
                    let [b, heads, _, _] = probabilities.dims();
                    let reference = Tensor::<4>::from_data(data, &probabilities.device());
                    // `((p - ref) ** 2).sum((1, 2)).mean(0)` over diffusers' [B * heads, S, S_kv].
                    let term = probabilities
                        .clone()
                        .sub(reference)
                        .powi_scalar(2)
                        .sum()
                        .div_scalar((b * heads) as f64);
                    state.loss = Some(match state.loss.take() {
                        Some(acc) => acc.add(term),
                        None => term,
                    });
                }
                None => {
                    if state.error.is_none() {
                        state.error = Some(Error::invalid_argument(
                            "latents",
                            format!(
                                "no reference cross-attention map of `{}` at this timestep",
                                layer.path()
                            ),
                        ));
                    }
                }
            },
        }
        probabilities
    }
}
