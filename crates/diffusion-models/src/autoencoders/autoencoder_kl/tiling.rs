//! Tile blending of `AutoencoderKL.tiled_encode` / `tiled_decode`.
//!
//! diffusers blends tiles in place: after tile `(i, j)` has been blended with the tile above and
//! the tile to its left, that blended tile is what its own right and lower neighbours blend
//! with. [`stitch`] keeps that order, so the output matches diffusers, not an idealised blend.

use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};

/// The weights `1 - y / extent` (of `a`) and `y / extent` (of `b`), computed in double
/// precision and rounded once, as a Python float times an f32 tensor is.
fn blend_weights(extent: usize) -> (Vec<f32>, Vec<f32>) {
    (0..extent)
        .map(|y| {
            let t = y as f64 / extent as f64;
            ((1.0 - t) as f32, t as f32)
        })
        .unzip()
}

fn weight_tensor(values: Vec<f32>, shape: [usize; 4], like: &Tensor<4>) -> Tensor<4> {
    let t = Tensor::<4>::from_data(TensorData::new(values, shape), &like.device());
    if t.dtype() == like.dtype() {
        t
    } else {
        t.cast(FloatDType::from(like.dtype()))
    }
}

/// Blend the last rows of `a` (the tile above) into the first rows of `b`:
/// `b[:, :, y] = a[:, :, -e + y] * (1 - y / e) + b[:, :, y] * (y / e)` for
/// `y < e = min(a.h, b.h, blend_extent)` (diffusers' `blend_v`).
///
/// # Shapes
/// - `a`: `[B, C, Ha, W]`, `b`: `[B, C, Hb, W]`
/// - output: `[B, C, Hb, W]`
///
/// # Panics
/// When `a` and `b` differ in batch, channels or width.
pub fn blend_v(a: &Tensor<4>, b: Tensor<4>, blend_extent: usize) -> Tensor<4> {
    blend(a, b, blend_extent, 2)
}

/// Blend the last columns of `a` (the tile to the left) into the first columns of `b`
/// (diffusers' `blend_h`).
///
/// # Shapes
/// - `a`: `[B, C, H, Wa]`, `b`: `[B, C, H, Wb]`
/// - output: `[B, C, H, Wb]`
///
/// # Panics
/// When `a` and `b` differ in batch, channels or height.
pub fn blend_h(a: &Tensor<4>, b: Tensor<4>, blend_extent: usize) -> Tensor<4> {
    blend(a, b, blend_extent, 3)
}

fn blend(a: &Tensor<4>, b: Tensor<4>, blend_extent: usize, dim: usize) -> Tensor<4> {
    let len_a = a.dims()[dim];
    let len_b = b.dims()[dim];
    let extent = blend_extent.min(len_a).min(len_b);
    if extent == 0 {
        return b;
    }
    let (wa, wb) = blend_weights(extent);
    let mut shape = [1; 4];
    shape[dim] = extent;
    let wa = weight_tensor(wa, shape, &b);
    let wb = weight_tensor(wb, shape, &b);
    let head = a
        .clone()
        .narrow(dim, len_a - extent, extent)
        .mul(wa)
        .add(b.clone().narrow(dim, 0, extent).mul(wb));
    if extent == len_b {
        head
    } else {
        Tensor::cat(vec![head, b.narrow(dim, extent, len_b - extent)], dim)
    }
}

/// Where tiles start along a side of `len`: `range(0, len, step)`.
pub(super) fn tile_starts(len: usize, step: usize) -> Vec<usize> {
    (0..len).step_by(step.max(1)).collect()
}

/// Blend a grid of processed tiles with their upper and left neighbours (in diffusers' order),
/// crop each to `row_limit × row_limit` and concatenate them.
///
/// # Shapes
/// - `rows[i][j]`: `[B, C, h_i, w_j]` (tiles of a row share their height, tiles of a column
///   their width)
/// - output: `[B, C, Σ min(h_i, row_limit), Σ min(w_j, row_limit)]`
pub(super) fn stitch(
    mut rows: Vec<Vec<Tensor<4>>>,
    blend_extent: usize,
    row_limit: usize,
) -> Tensor<4> {
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend_v(&rows[i - 1][j], tile, blend_extent);
            }
            if j > 0 {
                tile = blend_h(&rows[i][j - 1], tile, blend_extent);
            }
            rows[i][j] = tile;
        }
    }
    let result_rows: Vec<Tensor<4>> = rows
        .into_iter()
        .map(|row| {
            let cropped: Vec<Tensor<4>> = row
                .into_iter()
                .map(|tile| {
                    let [_, _, h, w] = tile.dims();
                    tile.narrow(2, 0, h.min(row_limit))
                        .narrow(3, 0, w.min(row_limit))
                })
                .collect();
            Tensor::cat(cropped, 3)
        })
        .collect();
    Tensor::cat(result_rows, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::Device;
    use diffusion_core::tensor::{from_vec, to_vec};

    /// diffusers' loop, on host vectors of shape `[h, w]`.
    fn blend_v_loop(a: &[f32], ha: usize, b: &[f32], hb: usize, w: usize, e: usize) -> Vec<f32> {
        let e = e.min(ha).min(hb);
        let mut out = b.to_vec();
        for y in 0..e {
            let t = y as f64 / e as f64;
            for x in 0..w {
                out[y * w + x] =
                    a[(ha - e + y) * w + x] * (1.0 - t) as f32 + b[y * w + x] * t as f32;
            }
        }
        out
    }

    #[test]
    fn blend_v_matches_the_diffusers_loop() {
        let device = Device::flex();
        let a: Vec<f32> = (0..30).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..20).map(|v| (v as f32 * 0.91).cos()).collect();
        for extent in [0, 1, 3, 4, 9] {
            let got = to_vec(blend_v(
                &from_vec(a.clone(), [1, 1, 6, 5], &device),
                from_vec(b.clone(), [1, 1, 4, 5], &device),
                extent,
            ));
            assert_eq!(
                got,
                blend_v_loop(&a, 6, &b, 4, 5, extent),
                "extent {extent}"
            );
        }
    }

    #[test]
    fn blend_h_is_blend_v_transposed() {
        let device = Device::flex();
        let a = from_vec((0..24).map(|v| v as f32).collect(), [1, 2, 3, 4], &device);
        let b = from_vec(
            (0..18).map(|v| -(v as f32)).collect(),
            [1, 2, 3, 3],
            &device,
        );
        let h = blend_h(&a, b.clone(), 2);
        let v = blend_v(&a.swap_dims(2, 3), b.swap_dims(2, 3), 2).swap_dims(2, 3);
        assert_eq!(to_vec(h), to_vec(v));
    }

    #[test]
    fn tile_starts_step_like_python_range() {
        assert_eq!(tile_starts(40, 12), [0, 12, 24, 36]);
        assert_eq!(tile_starts(24, 12), [0, 12]);
        assert_eq!(tile_starts(5, 8), [0]);
    }
}
