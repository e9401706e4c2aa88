//! Attention hooks: every transformer attention reports its state-dict path, attention maps
//! can be captured, and a hook that changes what a layer computes changes the output.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_models::attention_processor::{Attention, scaled_dot_product_attention};
use diffusion_models::state_dict::param_shapes;
use diffusion_models::{AttentionHook, UNet2DConditionModel};

use crate::{Io, TOLERANCE, load, max_abs_diff, values};

/// One captured map: layer path, `[B, heads, S, S_kv]`, values.
type AttentionMap = (String, [usize; 4], Vec<f32>);

/// Records the cross-attention probabilities of every `attn2` layer.
#[derive(Default)]
struct CaptureCrossAttention {
    maps: Mutex<Vec<AttentionMap>>,
}

impl AttentionHook for CaptureCrossAttention {
    fn wants_probabilities(&self, layer: &Attention) -> bool {
        layer.path().ends_with(".attn2")
    }

    fn probabilities(&self, layer: &Attention, probabilities: Tensor<4>) -> Tensor<4> {
        let dims = probabilities.dims();
        let values = to_vec(probabilities.clone());
        self.maps
            .lock()
            .unwrap()
            .push((layer.path().to_string(), dims, values));
        probabilities
    }
}

/// Multiplies one layer's output by `factor`.
struct ScaleOutput {
    path: String,
    factor: f64,
    calls: Mutex<usize>,
}

impl AttentionHook for ScaleOutput {
    fn output(&self, layer: &Attention, output: Tensor<3>) -> Tensor<3> {
        if layer.path() == self.path {
            *self.calls.lock().unwrap() += 1;
            output.mul_scalar(self.factor)
        } else {
            output
        }
    }
}

/// diffusers' default processor rewritten outside the crate through `replace`: what a custom
/// processor (IP-Adapter, ...) starts from.
struct ReimplementedProcessor {
    calls: Mutex<BTreeSet<String>>,
}

impl AttentionHook for ReimplementedProcessor {
    fn replace(
        &self,
        layer: &Attention,
        hidden_states: &Tensor<3>,
        encoder_hidden_states: Option<&Tensor<3>>,
    ) -> Option<Tensor<3>> {
        self.calls.lock().unwrap().insert(layer.path().to_string());
        let context = encoder_hidden_states.unwrap_or(hidden_states).clone();
        let q = layer.split_heads(layer.to_q.forward(hidden_states.clone()));
        let k = layer.split_heads(layer.to_k.forward(context.clone()));
        let v = layer.split_heads(layer.to_v.forward(context));
        let out = layer.merge_heads(scaled_dot_product_attention(q, k, v, None));
        Some(layer.to_out[0].forward(out))
    }
}

fn run_sd1(model: &UNet2DConditionModel, io: &Io) -> Result<Vec<f32>> {
    Ok(values(io.run(model, "per_batch")?))
}

/// The `attn1` / `attn2` paths the model's state dict holds.
fn attention_paths(model: &UNet2DConditionModel, which: &str) -> BTreeSet<String> {
    param_shapes(model)
        .keys()
        .filter_map(|k| k.strip_suffix(".to_q.weight"))
        .filter(|p| p.ends_with(which))
        .map(str::to_string)
        .collect()
}

#[test]
fn cross_attention_maps_are_captured_per_layer_path() -> Result<()> {
    let mut model = load("sd1_tiny")?;
    let io = Io::open("sd1_tiny")?;
    let plain = run_sd1(&model, &io)?;
    let hook = Arc::new(CaptureCrossAttention::default());
    model.set_attention_hook(hook.clone());
    let hooked = run_sd1(&model, &io)?;
    // Capturing forgoes the fused kernel but computes the same thing.
    assert!(max_abs_diff(&hooked, &plain) <= 1e-5);

    let maps = hook.maps.lock().unwrap();
    let seen: BTreeSet<String> = maps.iter().map(|(p, _, _)| p.clone()).collect();
    assert_eq!(maps.len(), seen.len(), "each layer once per forward");
    let expected = attention_paths(&model, ".attn2");
    assert_eq!(expected.len(), 11, "{expected:?}");
    assert_eq!(seen, expected);
    assert!(seen.contains("down_blocks.0.attentions.1.transformer_blocks.0.attn2"));
    assert!(seen.contains("mid_block.attentions.0.transformer_blocks.0.attn2"));
    for (path, [b, heads, s_q, s_kv], probs) in maps.iter() {
        assert_eq!((*b, *heads, *s_kv), (2, 2, 5), "{path}");
        let side = if path.starts_with("down_blocks.0") || path.starts_with("up_blocks.2") {
            16
        } else if path.starts_with("mid_block") {
            4
        } else {
            8
        };
        assert_eq!(*s_q, side * side, "{path}");
        for row in probs.chunks(*s_kv) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{path}: row sums to {sum}");
            assert!(row.iter().all(|p| (0.0..=1.0).contains(p)));
        }
    }
    drop(maps);

    // Cleared, the model is back to the fused path and no more maps arrive.
    model.clear_attention_hook();
    assert!(model.attention_hook().is_none());
    run_sd1(&model, &io)?;
    assert_eq!(hook.maps.lock().unwrap().len(), 11);
    Ok(())
}

#[test]
fn a_hook_that_scales_one_output_changes_the_result() -> Result<()> {
    let mut model = load("sd1_tiny")?;
    let io = Io::open("sd1_tiny")?;
    let plain = run_sd1(&model, &io)?;
    let path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2".to_string();
    for (factor, should_change) in [(1.0, false), (2.0, true)] {
        let hook = Arc::new(ScaleOutput {
            path: path.clone(),
            factor,
            calls: Mutex::new(0),
        });
        model.set_attention_hook(hook.clone());
        let out = run_sd1(&model, &io)?;
        assert_eq!(*hook.calls.lock().unwrap(), 1);
        let diff = max_abs_diff(&out, &plain);
        if should_change {
            assert!(
                diff > 100.0 * TOLERANCE,
                "scaling {path} by {factor}: {diff:e}"
            );
        } else {
            assert!(diff <= 1e-6, "identity hook changed the output: {diff:e}");
        }
    }
    Ok(())
}

#[test]
fn a_processor_written_outside_the_crate_reproduces_the_default() -> Result<()> {
    let mut model = load("sd2_tiny")?;
    let io = Io::open("sd2_tiny")?;
    let plain = values(io.run(&model, "t10")?);
    let hook = Arc::new(ReimplementedProcessor {
        calls: Mutex::new(BTreeSet::new()),
    });
    model.set_attention_hook(hook.clone());
    let replaced = values(io.run(&model, "t10")?);
    assert!(max_abs_diff(&replaced, &plain) <= 1e-5);
    let mut all = attention_paths(&model, ".attn1");
    all.extend(attention_paths(&model, ".attn2"));
    assert_eq!(*hook.calls.lock().unwrap(), all);
    Ok(())
}
