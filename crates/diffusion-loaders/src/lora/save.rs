//! Writing an adapter in PEFT format with diffusers' `lora_adapter_metadata`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use diffusion_core::config::write_atomically;
use diffusion_core::tensor::to_vec;
use diffusion_core::{Error, Result};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::format::LORA_ADAPTER_METADATA_KEY;
use super::{Adapter, LoraComponent};

/// The value occurring most often (the smallest on ties), as diffusers picks `r` and
/// `lora_alpha` before listing the exceptions in `rank_pattern` / `alpha_pattern`.
fn most_common(values: impl Iterator<Item = f32>) -> f32 {
    let mut counts: Vec<(f32, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    counts.first().map(|(v, _)| *v).unwrap_or(1.0)
}

fn number(v: f32) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        serde_json::json!(v as i64)
    } else {
        serde_json::json!(v)
    }
}

/// The `LoraConfig` fields of one component, prefixed as diffusers packs them.
fn component_metadata(
    component: LoraComponent,
    layers: &BTreeMap<String, super::LoraLayer>,
    out: &mut serde_json::Map<String, serde_json::Value>,
) {
    let r = most_common(layers.values().map(|l| l.rank() as f32));
    let alpha = most_common(layers.values().map(|l| l.alpha));
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    // peft matches these names as suffixes of module paths. Without CLIP's `text_model.`
    // level they match transformers 4 (which has it) and 5 (which does not); diffusers strips
    // it from the tensor keys but not from the config.
    let config_name = |module: &str| {
        module
            .strip_prefix("text_model.")
            .unwrap_or(module)
            .to_string()
    };
    for (module, layer) in layers {
        if layer.rank() as f32 != r {
            rank_pattern.insert(config_name(module), number(layer.rank() as f32));
        }
        if layer.alpha != alpha {
            alpha_pattern.insert(config_name(module), number(layer.alpha));
        }
    }
    let p = component.prefix();
    let lora_bias = layers.values().any(|l| l.up_bias.is_some());
    let targets: Vec<String> = layers.keys().map(|m| config_name(m)).collect();
    out.insert(format!("{p}.r"), number(r));
    out.insert(format!("{p}.lora_alpha"), number(alpha));
    out.insert(format!("{p}.rank_pattern"), rank_pattern.into());
    out.insert(format!("{p}.alpha_pattern"), alpha_pattern.into());
    out.insert(format!("{p}.target_modules"), serde_json::json!(targets));
    out.insert(format!("{p}.lora_bias"), serde_json::json!(lora_bias));
    out.insert(format!("{p}.use_dora"), serde_json::json!(false));
    out.insert(format!("{p}.use_rslora"), serde_json::json!(false));
    out.insert(format!("{p}.peft_type"), serde_json::json!("LORA"));
}

pub(crate) fn write_peft(path: &Path, adapter: &Adapter) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut metadata = serde_json::Map::new();
    let bytes = |values: Vec<f32>| values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (component, layers) in &adapter.layers {
        let p = component.prefix();
        for (module, layer) in layers {
            tensors.push((
                format!("{p}.{module}.lora_A.weight"),
                layer.down_shape.clone(),
                bytes(to_vec(layer.down.clone())),
            ));
            tensors.push((
                format!("{p}.{module}.lora_B.weight"),
                layer.up_shape.clone(),
                bytes(to_vec(layer.up.clone())),
            ));
            if let Some(bias) = &layer.up_bias {
                tensors.push((
                    format!("{p}.{module}.lora_B.bias"),
                    vec![layer.up_shape[0]],
                    bytes(to_vec(bias.clone())),
                ));
            }
        }
        // rsLoRA layers are written with their effective alpha, so `use_rslora` is false.
        let effective: BTreeMap<String, super::LoraLayer> = layers
            .iter()
            .map(|(m, l)| {
                let mut l = l.clone();
                l.alpha = l.scale * l.rank() as f32;
                (m.clone(), l)
            })
            .collect();
        component_metadata(*component, &effective, &mut metadata);
    }
    let views = tensors
        .iter()
        .map(|(key, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (key.as_str(), view))
                .map_err(|e| Error::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("`{key}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let info = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            LORA_ADAPTER_METADATA_KEY.to_string(),
            serde_json::to_string_pretty(&metadata).unwrap_or_default(),
        ),
    ]);
    let data = safetensors::serialize(views, Some(info)).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomically(path, &data)
}
