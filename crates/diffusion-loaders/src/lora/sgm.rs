//! kohya's SDXL UNet names: the original (sgm / LDM) layout with `_` for `.`
//! (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), turned into diffusers paths with `_`
//! (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`), as diffusers'
//! `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key` do.

/// Split `<index>_rest` (or a bare `<index>`) into the index and the rest.
fn leading_index(name: &str) -> Option<(usize, &str)> {
    let (digits, rest) = name.split_once('_').unwrap_or((name, ""));
    Some((digits.parse().ok()?, rest))
}

/// Split `<prefix>_<index>_rest` into the index and the rest.
fn index_after<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    leading_index(name.strip_prefix(prefix)?.strip_prefix('_')?)
}

/// Resnet sub-module names: sgm → diffusers.
fn resnet_inner(rest: &str) -> String {
    for (sgm, diffusers) in [
        ("in_layers_2", "conv1"),
        ("out_layers_3", "conv2"),
        ("emb_layers_1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ] {
        if let Some(tail) = rest.strip_prefix(sgm) {
            return format!("{diffusers}{tail}");
        }
    }
    rest.to_string()
}

fn join(head: String, rest: &str) -> String {
    if rest.is_empty() {
        head
    } else {
        format!("{head}_{rest}")
    }
}

/// The diffusers name (with `_`) of an sgm-layout kohya UNet name, for a UNet with
/// `layers_per_block` resnets per down block; `None` when the name is not in that layout.
pub(crate) fn sgm_to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    let n = layers_per_block + 1;
    for (sgm, diffusers) in [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
        ("input_blocks_0_0", "conv_in"),
    ] {
        if name == sgm {
            return Some(diffusers.to_string());
        }
    }
    if let Some((i, rest)) = index_after(name, "input_blocks") {
        let i = i.checked_sub(1)?;
        let (block, layer) = (i / n, i % n);
        let (j, rest) = leading_index(rest)?;
        return Some(match (j, rest) {
            (0, "op") => format!("down_blocks_{block}_downsamplers_0_conv"),
            (0, rest) => join(
                format!("down_blocks_{block}_resnets_{layer}"),
                &resnet_inner(rest),
            ),
            (1, rest) => join(format!("down_blocks_{block}_attentions_{layer}"), rest),
            _ => return None,
        });
    }
    if let Some((i, rest)) = index_after(name, "middle_block") {
        let head = match i {
            0 => "mid_block_resnets_0",
            1 => "mid_block_attentions_0",
            2 => "mid_block_resnets_1",
            _ => return None,
        };
        let rest = if i == 1 {
            rest.to_string()
        } else {
            resnet_inner(rest)
        };
        return Some(join(head.to_string(), &rest));
    }
    if let Some((i, rest)) = index_after(name, "output_blocks") {
        let (block, layer) = (i / n, i % n);
        let (j, rest) = leading_index(rest)?;
        return Some(match (j, rest) {
            (0, rest) => join(
                format!("up_blocks_{block}_resnets_{layer}"),
                &resnet_inner(rest),
            ),
            // An up block without transformers has its upsampler second.
            (1 | 2, "conv") => format!("up_blocks_{block}_upsamplers_0_conv"),
            (1, rest) => join(format!("up_blocks_{block}_attentions_{layer}"), rest),
            _ => return None,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::sgm_to_diffusers;

    #[test]
    fn sdxl_names_map_like_diffusers() {
        let map = |s| sgm_to_diffusers(s, 2).unwrap();
        assert_eq!(
            map("input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            map("input_blocks_5_0_in_layers_2"),
            "down_blocks_1_resnets_1_conv1"
        );
        assert_eq!(
            map("input_blocks_3_0_op"),
            "down_blocks_0_downsamplers_0_conv"
        );
        assert_eq!(
            map("middle_block_2_emb_layers_1"),
            "mid_block_resnets_1_time_emb_proj"
        );
        assert_eq!(
            map("middle_block_1_proj_in"),
            "mid_block_attentions_0_proj_in"
        );
        assert_eq!(
            map("output_blocks_4_0_skip_connection"),
            "up_blocks_1_resnets_1_conv_shortcut"
        );
        assert_eq!(
            map("output_blocks_2_2_conv"),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(map("input_blocks_0_0"), "conv_in");
        assert_eq!(sgm_to_diffusers("down_blocks_0_resnets_0_conv1", 2), None);
    }
}
