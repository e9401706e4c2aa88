//! Adapter weights per component and, for the UNet, per block (diffusers' `set_adapters` with a
//! dict of scales).

use std::collections::BTreeMap;

use diffusion_core::{Error, Result};

use super::LoraComponent;

/// How much of one adapter each model gets: diffusers' `adapter_weights` entry, a number or a
/// dict `{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`.
///
/// ```
/// use std::collections::BTreeMap;
/// use diffusion_loaders::lora::{AdapterWeights, BlockWeights, UNetWeights};
///
/// // diffusers: {"unet": {"down": 0.5, "up": {"block_1": [0.2, 0.4, 0.6]}}, "text_encoder": 0.3}
/// let weights = AdapterWeights {
///     unet: UNetWeights::Blocks {
///         down: BlockWeights::Uniform(0.5),
///         mid: 1.0,
///         up: BlockWeights::PerBlock(BTreeMap::from([(1, vec![0.2, 0.4, 0.6])])),
///     },
///     text_encoder: 0.3,
///     text_encoder_2: 1.0,
/// };
/// assert_eq!(AdapterWeights::from(0.7).text_encoder, 0.7);
/// # let _ = weights;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterWeights {
    /// The UNet's weight, uniform or per block.
    pub unet: UNetWeights,
    /// The text encoder's weight.
    pub text_encoder: f32,
    /// The second text encoder's weight.
    pub text_encoder_2: f32,
}

impl From<f32> for AdapterWeights {
    /// The same weight everywhere (a plain number in diffusers).
    fn from(weight: f32) -> Self {
        Self {
            unet: UNetWeights::Uniform(weight),
            text_encoder: weight,
            text_encoder_2: weight,
        }
    }
}

/// The UNet part of [`AdapterWeights`].
#[derive(Clone, Debug, PartialEq)]
pub enum UNetWeights {
    /// One weight for every adapted module.
    Uniform(f32),
    /// diffusers' `{"down": ..., "mid": ..., "up": ...}`: weights of the transformers
    /// (`attentions.<j>`) of each block. As in diffusers, other modules of a block take the
    /// weight of the transformer with their own index (`down_blocks.1.resnets.0` that of
    /// `down_blocks.1.attentions.0`) and modules with no such transformer take 1.
    Blocks {
        /// Down blocks with attention.
        down: BlockWeights,
        /// The mid block's transformer.
        mid: f32,
        /// Up blocks with attention.
        up: BlockWeights,
    },
}

/// The weights of one side (down or up) of the UNet.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockWeights {
    /// The same weight for every transformer of every block with attention.
    Uniform(f32),
    /// By block index (diffusers' `block_<i>`): one weight for all its transformers, or one
    /// per transformer. Blocks with attention that are not listed get 1.
    PerBlock(BTreeMap<usize, Vec<f32>>),
}

/// [`AdapterWeights`] resolved against a model: the weight of each adapted module.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ResolvedWeights {
    unet: ResolvedUNet,
    text_encoder: f32,
    text_encoder_2: f32,
}

#[derive(Clone, Debug, PartialEq)]
enum ResolvedUNet {
    Uniform(f32),
    /// `down_blocks.1.attentions.0` → weight.
    Layers(BTreeMap<String, f32>),
}

impl ResolvedWeights {
    pub fn uniform(weight: f32) -> Self {
        Self {
            unet: ResolvedUNet::Uniform(weight),
            text_encoder: weight,
            text_encoder_2: weight,
        }
    }

    /// The weight of `module` (a parameter path without `.weight`) of `component`.
    pub fn module_weight(&self, component: LoraComponent, module: &str) -> f32 {
        match component {
            LoraComponent::TextEncoder => self.text_encoder,
            LoraComponent::TextEncoder2 => self.text_encoder_2,
            LoraComponent::Unet => match &self.unet {
                ResolvedUNet::Uniform(w) => *w,
                ResolvedUNet::Layers(layers) => {
                    if let Some(w) = layers
                        .iter()
                        .find(|(layer, _)| module.contains(layer.as_str()))
                        .map(|(_, w)| *w)
                    {
                        return w;
                    }
                    let parts: Vec<&str> = module.split('.').collect();
                    if parts.len() < 4 {
                        return 1.0;
                    }
                    let key = format!("{}.{}.attentions.{}", parts[0], parts[1], parts[3]);
                    layers.get(&key).copied().unwrap_or(1.0)
                }
            },
        }
    }
}

/// Transformer counts per block of a UNet, read from its parameter keys:
/// `(down, up)` maps of block index → number of `attentions.<j>`, and whether the mid block
/// has a transformer.
pub(crate) struct UNetLayout {
    pub down: BTreeMap<usize, usize>,
    pub up: BTreeMap<usize, usize>,
    pub mid: bool,
}

impl UNetLayout {
    pub fn from_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Self {
        let mut layout = Self {
            down: BTreeMap::new(),
            up: BTreeMap::new(),
            mid: false,
        };
        for key in keys {
            let parts: Vec<&str> = key.split('.').collect();
            if parts.len() < 4 || parts[2] != "attentions" {
                layout.mid |= key.starts_with("mid_block.attentions.0.");
                continue;
            }
            let (Ok(block), Ok(j)) = (parts[1].parse::<usize>(), parts[3].parse::<usize>()) else {
                continue;
            };
            let side = match parts[0] {
                "down_blocks" => &mut layout.down,
                "up_blocks" => &mut layout.up,
                _ => continue,
            };
            let count = side.entry(block).or_insert(0);
            *count = (*count).max(j + 1);
        }
        layout
    }
}

fn invalid(message: String) -> Error {
    Error::invalid_argument("adapter_weights", message)
}

fn expand_side(
    side: &str,
    weights: &BlockWeights,
    blocks: &BTreeMap<usize, usize>,
    out: &mut BTreeMap<String, f32>,
) -> Result<()> {
    let prefix = if side == "down" {
        "down_blocks"
    } else {
        "up_blocks"
    };
    if let BlockWeights::PerBlock(given) = weights
        && let Some(block) = given.keys().find(|b| !blocks.contains_key(b))
    {
        return Err(invalid(format!(
            "{side}.block_{block}: the UNet has no transformer there (blocks with attention: {:?})",
            blocks.keys().collect::<Vec<_>>()
        )));
    }
    for (&block, &count) in blocks {
        let per_transformer = match weights {
            BlockWeights::Uniform(w) => vec![*w; count],
            BlockWeights::PerBlock(given) => match given.get(&block).map(Vec::as_slice) {
                None => vec![1.0; count],
                Some([w]) => vec![*w; count],
                Some(list) if list.len() == count => list.to_vec(),
                Some(list) => {
                    return Err(invalid(format!(
                        "expected {count} weights for {side}.block_{block}, got {}",
                        list.len()
                    )));
                }
            },
        };
        for (j, w) in per_transformer.into_iter().enumerate() {
            out.insert(format!("{prefix}.{block}.attentions.{j}"), w);
        }
    }
    Ok(())
}

/// Resolve `weights` against a UNet's layout (diffusers' `_maybe_expand_lora_scales`).
pub(crate) fn resolve(
    weights: &AdapterWeights,
    layout: Option<&UNetLayout>,
) -> Result<ResolvedWeights> {
    let unet = match (&weights.unet, layout) {
        (UNetWeights::Uniform(w), _) => ResolvedUNet::Uniform(*w),
        (UNetWeights::Blocks { .. }, None) => {
            return Err(invalid("per-block weights need the UNet".into()));
        }
        (UNetWeights::Blocks { down, mid, up }, Some(layout)) => {
            let mut layers = BTreeMap::new();
            if layout.mid {
                layers.insert("mid_block.attentions.0".to_string(), *mid);
            } else if *mid != 1.0 {
                return Err(invalid(
                    "mid: the UNet's mid block has no transformer".into(),
                ));
            }
            expand_side("down", down, &layout.down, &mut layers)?;
            expand_side("up", up, &layout.up, &mut layers)?;
            ResolvedUNet::Layers(layers)
        }
    };
    Ok(ResolvedWeights {
        unet,
        text_encoder: weights.text_encoder,
        text_encoder_2: weights.text_encoder_2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_expand_like_diffusers() {
        let keys: Vec<String> = [
            "down_blocks.1.attentions.1.proj_in.weight",
            "down_blocks.2.attentions.0.proj_in.weight",
            "down_blocks.2.attentions.1.proj_in.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.0.attentions.2.proj_in.weight",
            "up_blocks.1.attentions.2.proj_in.weight",
        ]
        .map(String::from)
        .into();
        let layout = UNetLayout::from_keys(keys.iter());
        let weights = AdapterWeights {
            unet: UNetWeights::Blocks {
                down: BlockWeights::Uniform(2.0),
                mid: 3.0,
                up: BlockWeights::PerBlock(BTreeMap::from([
                    (0, vec![4.0]),
                    (1, vec![5.0, 6.0, 7.0]),
                ])),
            },
            text_encoder: 0.5,
            text_encoder_2: 1.0,
        };
        let resolved = resolve(&weights, Some(&layout)).unwrap();
        let w = |m: &str| resolved.module_weight(LoraComponent::Unet, m);
        assert_eq!(
            w("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            2.0
        );
        assert_eq!(w("mid_block.attentions.0.proj_in"), 3.0);
        assert_eq!(w("up_blocks.0.attentions.1.proj_out"), 4.0);
        assert_eq!(w("up_blocks.1.attentions.2.proj_out"), 7.0);
        // A resnet takes the weight of the transformer with its index; without one, 1.
        assert_eq!(w("up_blocks.1.resnets.1.conv1"), 6.0);
        assert_eq!(w("up_blocks.2.resnets.1.conv1"), 1.0);
        assert_eq!(w("mid_block.resnets.0.conv1"), 1.0);
        assert_eq!(resolved.module_weight(LoraComponent::TextEncoder, "x"), 0.5);

        let bad = AdapterWeights {
            unet: UNetWeights::Blocks {
                down: BlockWeights::PerBlock(BTreeMap::from([(0, vec![1.0])])),
                mid: 1.0,
                up: BlockWeights::Uniform(1.0),
            },
            ..AdapterWeights::from(1.0)
        };
        assert!(resolve(&bad, Some(&layout)).is_err());
    }
}
