//! Reading LoRA files: key spellings, alphas and metadata, before module names are resolved
//! against a model.
//!
//! Spellings understood (diffusers' `lora_state_dict` and `convert_state_dict_to_peft` accept
//! the same ones):
//!
//! - PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight` (and `.lora_B.bias`);
//! - older diffusers: `<module>.lora.down.weight` / `.lora.up.weight`, the text encoder's
//!   `<module>.lora_linear_layer.down.weight`, and attention processors'
//!   `<attn>.processor.to_q_lora.down.weight` (`to_k`, `to_v`, `to_out`);
//! - kohya / A1111: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
//!   `lora_te_` (or `lora_te1_`) and `lora_te2_` for the two text encoders.
//!
//! A key without a component prefix belongs to the UNet, as in `load_attn_procs` files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use diffusion_core::weights::SafetensorsFile;
use diffusion_core::{Error, Result};

use super::LoraComponent;

/// diffusers' safetensors metadata key holding the `LoraConfig` of each component.
pub(crate) const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// How a file names a module before it is resolved against a model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ModuleName {
    /// A dotted diffusers / transformers path (`down_blocks.0.resnets.0.conv1`).
    Dotted(String),
    /// A kohya name: the dotted path with `_` for `.` (`down_blocks_0_resnets_0_conv1`).
    Kohya(String),
}

/// Which factor of a layer a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    UpBias,
    Alpha,
}

/// One stored tensor: its key in the file, values and shape.
#[derive(Clone, Debug)]
pub(crate) struct StoredTensor {
    pub key: String,
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

/// The tensors of one LoRA layer as found in the file.
#[derive(Clone, Debug, Default)]
pub(crate) struct RawLayer {
    pub down: Option<StoredTensor>,
    pub up: Option<StoredTensor>,
    pub up_bias: Option<StoredTensor>,
    /// The per-module `.alpha` (kohya, or diffusers' `network_alphas`).
    pub alpha: Option<f32>,
    /// Every file key of this layer, for reports.
    pub keys: Vec<String>,
}

/// A component's `LoraConfig` from the file metadata (the fields that change the maths).
#[derive(Clone, Debug, Default)]
pub(crate) struct ComponentConfig {
    pub lora_alpha: Option<f32>,
    pub alpha_pattern: BTreeMap<String, f32>,
    pub use_rslora: bool,
}

impl ComponentConfig {
    /// peft's pattern rule: a pattern key matches a module whose path is the key or ends with
    /// `.key`.
    pub fn alpha_for(&self, module: &str) -> Option<f32> {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map(|(_, v)| *v)
            .or(self.lora_alpha)
    }
}

/// A LoRA file split into layers per component.
#[derive(Debug, Default)]
pub(crate) struct RawLora {
    pub layers: BTreeMap<(LoraComponent, ModuleName), RawLayer>,
    pub configs: HashMap<LoraComponent, ComponentConfig>,
    /// Keys that are no LoRA tensor this port understands.
    pub unknown: Vec<String>,
}

fn kohya_prefix(key: &str) -> Option<(LoraComponent, &str)> {
    [
        ("lora_unet_", LoraComponent::Unet),
        ("lora_te1_", LoraComponent::TextEncoder),
        ("lora_te2_", LoraComponent::TextEncoder2),
        ("lora_te_", LoraComponent::TextEncoder),
    ]
    .into_iter()
    .find_map(|(prefix, c)| key.strip_prefix(prefix).map(|rest| (c, rest)))
}

/// The module an older diffusers attention-processor name (`attn1.processor.to_q`) stands for.
fn processor_module(component: LoraComponent, module: &str) -> Option<String> {
    let (parent, leaf) = module.rsplit_once('.')?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let leaf = match (component, leaf) {
        (LoraComponent::Unet, "to_q" | "to_k" | "to_v") => leaf,
        (LoraComponent::Unet, "to_out") => "to_out.0",
        (_, "to_q") => "q_proj",
        (_, "to_k") => "k_proj",
        (_, "to_v") => "v_proj",
        (_, "to_out") => "out_proj",
        _ => return None,
    };
    Some(format!("{parent}.{leaf}"))
}

fn parse_key(key: &str) -> Option<(LoraComponent, ModuleName, Part)> {
    if let Some((component, rest)) = kohya_prefix(key) {
        let (name, suffix) = rest.split_once('.')?;
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            _ => return None,
        };
        return Some((component, ModuleName::Kohya(name.to_string()), part));
    }
    let (component, rest) = [
        ("unet.", LoraComponent::Unet),
        ("text_encoder.", LoraComponent::TextEncoder),
        ("text_encoder_2.", LoraComponent::TextEncoder2),
    ]
    .into_iter()
    .find_map(|(prefix, c)| key.strip_prefix(prefix).map(|rest| (c, rest)))
    .unwrap_or((LoraComponent::Unet, key));
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_B.bias", Part::UpBias),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((component, ModuleName::Dotted(module.to_string()), part));
        }
    }
    for (suffix, part) in [
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            let module = processor_module(component, module)?;
            return Some((component, ModuleName::Dotted(module), part));
        }
    }
    let module = rest.strip_suffix(".alpha")?;
    Some((
        component,
        ModuleName::Dotted(module.to_string()),
        Part::Alpha,
    ))
}

fn parse_metadata(path: &Path, raw: &str) -> Result<HashMap<LoraComponent, ComponentConfig>> {
    let json: serde_json::Value = serde_json::from_str(raw).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: format!("`{LORA_ADAPTER_METADATA_KEY}` metadata: {e}"),
    })?;
    let mut configs: HashMap<LoraComponent, ComponentConfig> = HashMap::new();
    let Some(map) = json.as_object() else {
        return Ok(configs);
    };
    for (key, value) in map {
        let Some((prefix, field)) = key.rsplit_once('.') else {
            continue;
        };
        let Some(component) = LoraComponent::from_prefix(prefix) else {
            continue;
        };
        let config = configs.entry(component).or_default();
        match field {
            "lora_alpha" => config.lora_alpha = value.as_f64().map(|v| v as f32),
            "use_rslora" => config.use_rslora = value.as_bool().unwrap_or(false),
            "alpha_pattern" => {
                for (k, v) in value.as_object().into_iter().flatten() {
                    if let Some(v) = v.as_f64() {
                        config.alpha_pattern.insert(k.clone(), v as f32);
                    }
                }
            }
            "use_dora" if value.as_bool() == Some(true) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    field: key.clone(),
                    value: "true".into(),
                    reason: "DoRA adapters are not implemented".into(),
                });
            }
            _ => {}
        }
    }
    Ok(configs)
}

/// Key markers of adapter types that are not plain LoRA, with their names.
const UNSUPPORTED: [(&str, &str); 6] = [
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".lora_mid.", "LoCon with Tucker decomposition (lora_mid)"),
    (".hada_w", "LoHa"),
    (".lokr_w", "LoKr"),
    (".oft_", "OFT"),
];

/// Read every tensor of a LoRA file and sort it into layers.
pub(crate) fn read_lora(path: &Path) -> Result<RawLora> {
    let file = SafetensorsFile::open(path)?;
    let mut lora = RawLora::default();
    if let Some(raw) = file
        .user_metadata()
        .and_then(|m| m.get(LORA_ADAPTER_METADATA_KEY))
    {
        lora.configs = parse_metadata(path, raw)?;
    }
    for key in file.keys() {
        // Other low-rank schemes change the maths, not only the names: loading the plain LoRA
        // part of them would be silently wrong, even in lenient mode.
        if let Some(scheme) = UNSUPPORTED
            .iter()
            .find(|(marker, _)| key.contains(marker))
            .map(|(_, scheme)| *scheme)
        {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: key,
                value: scheme.into(),
                reason: format!("{scheme} adapters are not implemented, only LoRA / LoCon"),
            });
        }
        let Some((component, module, part)) = parse_key(&key) else {
            lora.unknown.push(key);
            continue;
        };
        let (values, shape) = file.read_f32(&key)?;
        let layer = lora.layers.entry((component, module)).or_default();
        layer.keys.push(key.clone());
        let stored = StoredTensor { key, values, shape };
        match part {
            Part::Down => layer.down = Some(stored),
            Part::Up => layer.up = Some(stored),
            Part::UpBias => layer.up_bias = Some(stored),
            Part::Alpha => layer.alpha = stored.values.first().copied(),
        }
    }
    Ok(lora)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(key: &str) -> (LoraComponent, ModuleName, Part) {
        parse_key(key).unwrap_or_else(|| panic!("{key}"))
    }

    #[test]
    fn every_spelling_names_the_module() {
        let dotted = |s: &str| ModuleName::Dotted(s.into());
        let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
        assert_eq!(
            parsed(&format!("unet.{attn}.to_q.lora_A.weight")),
            (
                LoraComponent::Unet,
                dotted(&format!("{attn}.to_q")),
                Part::Down
            )
        );
        assert_eq!(
            parsed(&format!("{attn}.processor.to_out_lora.up.weight")),
            (
                LoraComponent::Unet,
                dotted(&format!("{attn}.to_out.0")),
                Part::Up
            )
        );
        assert_eq!(
            parsed("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight"),
            (
                LoraComponent::TextEncoder,
                dotted("text_model.encoder.layers.0.self_attn.k_proj"),
                Part::Down
            )
        );
        assert_eq!(
            parsed("unet.mid_block.resnets.0.conv1.lora.up.weight"),
            (
                LoraComponent::Unet,
                dotted("mid_block.resnets.0.conv1"),
                Part::Up
            )
        );
        assert_eq!(
            parsed("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            (
                LoraComponent::TextEncoder2,
                ModuleName::Kohya("text_model_encoder_layers_0_mlp_fc1".into()),
                Part::Alpha
            )
        );
        assert_eq!(parse_key("lora_unet_conv_in.dora_scale"), None);
        assert_eq!(parse_key("unet.conv_in.weight"), None);
    }

    #[test]
    fn alpha_patterns_match_like_peft() {
        let config = ComponentConfig {
            lora_alpha: Some(8.0),
            alpha_pattern: [("attn1.to_q".to_string(), 2.0)].into(),
            use_rslora: false,
        };
        assert_eq!(config.alpha_for("down_blocks.0.attn1.to_q"), Some(2.0));
        assert_eq!(config.alpha_for("down_blocks.0.xattn1.to_q"), Some(8.0));
    }
}
