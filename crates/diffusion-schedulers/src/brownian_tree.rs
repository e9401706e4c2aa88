//! torchsde's Brownian interval, as diffusers' `BatchedBrownianTree` builds it, on the host.
//!
//! [`DPMSolverSDEScheduler`](crate::DPMSolverSDEScheduler) draws its noise from increments
//! `W(s, t)` of a Brownian motion that torchsde 0.2.6 (`_brownian/brownian_interval.py`)
//! samples lazily on a binary tree of time intervals. Reproducing diffusers' noise therefore
//! means reproducing that tree exactly:
//!
//! * every node's randomness comes from numpy's `SeedSequence(entropy, spawn_key=(key, depth),
//!   pool_size)` ([`SeedSequence`]), where the key of a child is `2 * parent + (0 left, 1
//!   right)`; the root uses `SeedSequence(entropy, pool_size)` directly;
//! * the normals are `torch.randn(size, generator=torch.Generator().manual_seed(seed))`
//!   ([`TorchGenerator`]) in float32;
//! * with `halfway_tree` every split is at the (rounded) middle of the interval, so the tree
//!   and therefore the sample path depend on the entropy only, not on the order of queries;
//! * all times are rounded to `-log10(tol)` decimals as Python's `round` does;
//! * a child's increment is the Brownian-bridge sample `mean + sqrt(var) * noise` computed in
//!   float32 from float64 coefficients, the right child taking the remainder of its parent.
//!
//! Only what diffusers uses is ported: no Lévy area (`levy_area_approximation="none"`) and
//! halfway trees. Increments are float32 host vectors; torch's vectorised `randn` differs from
//! [`TorchGenerator`] in the last bit of about one element in six (see its docs), so tree values
//! agree with torchsde to about 1e-6.

use std::collections::VecDeque;
use std::sync::Arc;

use diffusion_core::{Error, Result, TorchGenerator};

/// numpy's default `SeedSequence` pool size.
const DEFAULT_POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's `SeedSequence` (numpy/random/bit_generator.pyx): hashes entropy and a spawn key into
/// a pool of 32-bit words, from which [`Self::generate_state`] derives seeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSequence {
    pool: Vec<u32>,
}

/// A non-negative Python int as numpy's little-endian 32-bit words (`[0]` for 0).
fn int_words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while n > 0 {
        words.push((n & 0xffff_ffff) as u32);
        n >>= 32;
    }
    words
}

/// numpy's `hashmix`: the multiplier is updated as it goes.
fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

impl SeedSequence {
    /// `SeedSequence(entropy=entropy, spawn_key=spawn_key, pool_size=pool_size)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `pool_size` when it is below numpy's minimum of 4.
    pub fn new(entropy: u128, spawn_key: &[u128], pool_size: usize) -> Result<Self> {
        if pool_size < DEFAULT_POOL_SIZE {
            return Err(Error::invalid_argument(
                "pool_size",
                format!("must be at least {DEFAULT_POOL_SIZE}, got {pool_size}"),
            ));
        }
        let mut run_entropy = int_words(entropy);
        let spawn_entropy: Vec<u32> = spawn_key.iter().flat_map(|&k| int_words(k)).collect();
        // numpy pads the run entropy to the pool size only when there is a spawn key, keeping
        // unspawned small-entropy streams as they were before numpy 1.19.
        if !spawn_entropy.is_empty() && run_entropy.len() < pool_size {
            run_entropy.resize(pool_size, 0);
        }
        let entropy: Vec<u32> = run_entropy.into_iter().chain(spawn_entropy).collect();

        let mut pool = vec![0u32; pool_size];
        let mut hash_const = INIT_A;
        for (i, word) in pool.iter_mut().enumerate() {
            *word = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for i_src in 0..pool_size {
            for i_dst in 0..pool_size {
                if i_src != i_dst {
                    let hashed = hashmix(pool[i_src], &mut hash_const);
                    pool[i_dst] = mix(pool[i_dst], hashed);
                }
            }
        }
        for &word in entropy.iter().skip(pool_size) {
            for slot in pool.iter_mut() {
                let hashed = hashmix(word, &mut hash_const);
                *slot = mix(*slot, hashed);
            }
        }
        Ok(Self { pool })
    }

    /// `generate_state(n_words)` as 32-bit words.
    pub fn generate_state(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        self.pool
            .iter()
            .cycle()
            .take(n_words)
            .map(|&word| {
                let mut value = word ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect()
    }
}

/// Python's `round(x, ndigits)` for `ndigits >= 0`: the double nearest to the decimal value
/// with `ndigits` digits after the point nearest to `x` (ties to even on the exact binary
/// value), which is what Rust's exact float formatting and parsing give.
fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// One interval of the tree; children are created in pairs by a split.
#[derive(Clone, Debug)]
struct Node {
    start: f64,
    end: f64,
    parent: Option<usize>,
    is_left: bool,
    split: Option<Split>,
    /// The increment over the interval while cached (the root's is always kept).
    w: Option<Arc<Vec<f32>>>,
}

/// What a split fixes: where it is, its seed, and the two children.
#[derive(Clone, Debug)]
struct Split {
    midway: f64,
    spawn_key: u128,
    depth: u32,
    w_seed: u32,
    left: usize,
    right: usize,
}

/// torchsde's `BrownianInterval(t0, t1, size, entropy=entropy, tol=tol, pool_size=pool_size,
/// halfway_tree=True)` without Lévy area: increments `W(ta, tb)` of one Brownian motion of
/// shape `size`, deterministic in `entropy`.
#[derive(Clone, Debug)]
pub struct BrownianInterval {
    size: Vec<usize>,
    entropy: u128,
    pool_size: usize,
    ndigits: usize,
    nodes: Vec<Node>,
    /// Nodes whose increment is cached, oldest first (torchsde keeps 45).
    cached: VecDeque<usize>,
    cache_size: usize,
    last: usize,
}

/// The deepest split accepted: at `tol = 1e-6` a tree over `[0, 1e6]` needs about 40 levels.
const MAX_DEPTH: u32 = 120;

impl BrownianInterval {
    /// The tree diffusers builds for one seed: `tol = 1e-6`, `pool_size = 24`, halfway tree,
    /// a cache of 45 increments.
    ///
    /// # Errors
    /// As [`Self::with_options`].
    pub fn diffusers(t0: f64, t1: f64, size: &[usize], entropy: u128) -> Result<Self> {
        Self::with_options(t0, t1, size, entropy, 1e-6, 24, 45)
    }

    /// A halfway tree over `[t0, t1]` with torchsde's `tol`, `pool_size` and `cache_size`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for non-finite times, `t0 > t1`, a `tol` that is not a
    /// positive power of ten up to 1 (the quantisation is a number of decimals), a zero
    /// cache, or a pool below numpy's minimum.
    pub fn with_options(
        t0: f64,
        t1: f64,
        size: &[usize],
        entropy: u128,
        tol: f64,
        pool_size: usize,
        cache_size: usize,
    ) -> Result<Self> {
        if !t0.is_finite() || !t1.is_finite() {
            return Err(Error::invalid_argument(
                "t0",
                format!("times must be finite, got [{t0}, {t1}]"),
            ));
        }
        if t0 > t1 {
            return Err(Error::invalid_argument(
                "t0",
                format!("initial time {t0} should not exceed terminal time {t1}"),
            ));
        }
        let digits = -tol.log10();
        if !(tol > 0.0 && tol <= 1.0) || digits.fract() != 0.0 {
            return Err(Error::invalid_argument(
                "tol",
                format!("must be a power of ten in (0, 1], got {tol}"),
            ));
        }
        if cache_size == 0 {
            return Err(Error::invalid_argument("cache_size", "must be at least 1"));
        }
        let root_seeds = SeedSequence::new(entropy, &[], pool_size)?.generate_state(3);
        let ndigits = digits as usize;
        // torchsde scales the root increment by the unrounded span.
        let scale = (t1 - t0).sqrt() as f32;
        let w: Vec<f32> = normals(size, root_seeds[0])
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let root = Node {
            start: py_round(t0, ndigits),
            end: py_round(t1, ndigits),
            parent: None,
            is_left: false,
            split: None,
            w: Some(Arc::new(w)),
        };
        Ok(Self {
            size: size.to_vec(),
            entropy,
            pool_size,
            ndigits,
            nodes: vec![root],
            cached: VecDeque::new(),
            cache_size,
            last: 0,
        })
    }

    /// The shape of every increment.
    pub fn size(&self) -> &[usize] {
        &self.size
    }

    /// The interval `[t0, t1]` the tree covers (rounded to the tolerance).
    pub fn span(&self) -> (f64, f64) {
        (self.nodes[0].start, self.nodes[0].end)
    }

    /// `W(ta, tb)`, the increment between two times (`bm(ta, tb)`), flattened row-major.
    /// Times outside the tree's span are clamped to it, as torchsde does (with a warning
    /// there); equal times give zeros.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ta` when `ta > tb` or a time is NaN, or when the
    /// tree would have to grow deeper than is meaningful.
    pub fn increment(&mut self, ta: f64, tb: f64) -> Result<Vec<f32>> {
        if ta.is_nan() || tb.is_nan() {
            return Err(Error::invalid_argument("ta", "query times must not be NaN"));
        }
        let (start, end) = self.span();
        let ta = ta.clamp(start, end);
        let tb = tb.clamp(start, end);
        if ta > tb {
            return Err(Error::invalid_argument(
                "ta",
                format!("query times must satisfy ta <= tb, got {ta} and {tb}"),
            ));
        }
        let numel = self.size.iter().product();
        if ta == tb {
            return Ok(vec![0.0; numel]);
        }
        let ta = py_round(ta, self.ndigits);
        let tb = py_round(tb, self.ndigits);
        let intervals = self.locate(ta, tb)?;
        if let Some(&last) = intervals.last() {
            self.last = last;
        }
        let mut total: Option<Vec<f32>> = None;
        for node in intervals {
            let w = self.node_increment(node)?;
            total = Some(match total {
                None => w.as_ref().clone(),
                Some(mut acc) => {
                    acc.iter_mut().zip(w.iter()).for_each(|(a, b)| *a += b);
                    acc
                }
            });
        }
        Ok(total.unwrap_or_else(|| vec![0.0; numel]))
    }

    /// torchsde's `_loc`: the existing or newly split intervals that tile `[ta, tb]`, in
    /// order, searching from the last interval queried.
    fn locate(&mut self, ta: f64, tb: f64) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        let mut pending = vec![(self.last, ta, tb)];
        while let Some((mut node, ta, tb)) = pending.pop() {
            loop {
                let (start, end) = (self.nodes[node].start, self.nodes[node].end);
                if ta < start || tb > end {
                    node = self.nodes[node].parent.ok_or_else(|| {
                        Error::invalid_argument(
                            "ta",
                            format!("[{ta}, {tb}] is outside the tree's span [{start}, {end}]"),
                        )
                    })?;
                    continue;
                }
                if ta == start && tb == end {
                    out.push(node);
                    break;
                }
                let Some(split) = &self.nodes[node].split else {
                    if ta == start {
                        self.split(node, tb)?;
                        node = self.children(node).0;
                    } else {
                        self.split(node, ta)?;
                        node = self.children(node).1;
                    }
                    continue;
                };
                let (midway, left, right) = (split.midway, split.left, split.right);
                if tb <= midway {
                    node = left;
                } else if ta >= midway {
                    node = right;
                } else {
                    // Both halves: the left part first, then the right.
                    pending.push((right, midway, tb));
                    pending.push((left, ta, midway));
                    break;
                }
            }
        }
        Ok(out)
    }

    fn children(&self, node: usize) -> (usize, usize) {
        self.nodes[node]
            .split
            .as_ref()
            .map_or((node, node), |s| (s.left, s.right))
    }

    /// torchsde's halfway `_split`: split at the middle, then keep splitting the half that
    /// contains `point` until a split lands on it.
    fn split(&mut self, mut node: usize, point: f64) -> Result<()> {
        loop {
            let (start, end) = (self.nodes[node].start, self.nodes[node].end);
            let midway = self.split_exact(node, 0.5 * (end + start))?;
            let (left, right) = self.children(node);
            if point > midway {
                node = right;
            } else if point < midway {
                node = left;
            } else {
                return Ok(());
            }
        }
    }

    /// Create the two children of `node` at `midway` (rounded) and draw their seeds.
    fn split_exact(&mut self, node: usize, midway: f64) -> Result<f64> {
        let midway = py_round(midway, self.ndigits);
        let (spawn_key, depth) = match self.nodes[node].parent {
            None => (0u128, 0u32),
            Some(parent) => {
                let p = self.nodes[parent]
                    .split
                    .as_ref()
                    .map_or((0, 0), |s| (s.spawn_key, s.depth));
                let bit = u128::from(!self.nodes[node].is_left);
                (2 * p.0 + bit, p.1 + 1)
            }
        };
        if depth > MAX_DEPTH {
            return Err(Error::invalid_argument(
                "ta",
                format!("the Brownian tree would need more than {MAX_DEPTH} levels"),
            ));
        }
        let seeds = SeedSequence::new(
            self.entropy,
            &[spawn_key, u128::from(depth)],
            self.pool_size,
        )?
        .generate_state(4);
        let (start, end) = (self.nodes[node].start, self.nodes[node].end);
        let left = self.nodes.len();
        for (is_left, a, b) in [(true, start, midway), (false, midway, end)] {
            self.nodes.push(Node {
                start: py_round(a, self.ndigits),
                end: py_round(b, self.ndigits),
                parent: Some(node),
                is_left,
                split: None,
                w: None,
            });
        }
        self.nodes[node].split = Some(Split {
            midway,
            spawn_key,
            depth,
            w_seed: seeds[0],
            left,
            right: left + 1,
        });
        Ok(midway)
    }

    /// The increment over one node's interval, from its nearest cached ancestor down.
    fn node_increment(&mut self, node: usize) -> Result<Arc<Vec<f32>>> {
        let mut chain = Vec::new();
        let mut current = node;
        let mut w = loop {
            if let Some(w) = &self.nodes[current].w {
                break Arc::clone(w);
            }
            chain.push(current);
            current = self.nodes[current]
                .parent
                .ok_or_else(|| Error::invalid_argument("ta", "the tree lost its root"))?;
        };
        for &child in chain.iter().rev() {
            w = Arc::new(self.bridge(child, &w)?);
            self.remember(child, Arc::clone(&w));
        }
        Ok(w)
    }

    /// The Brownian bridge from a parent's increment to one child's (torchsde's
    /// `_increment_and_space_time_levy_area` without space-time Lévy area).
    fn bridge(&self, child: usize, parent_w: &[f32]) -> Result<Vec<f32>> {
        let parent = self.nodes[child]
            .parent
            .ok_or_else(|| Error::invalid_argument("ta", "the root has no bridge"))?;
        let p = &self.nodes[parent];
        let split = p
            .split
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("ta", "a child of an unsplit interval"))?;
        let h_reciprocal = 1.0 / (p.end - p.start);
        let left_diff = split.midway - p.start;
        let right_diff = p.end - split.midway;
        let var = left_diff * right_diff * h_reciprocal;
        // Python floats times float32 tensors: each scalar is rounded to float32 first.
        let (a, b, s) = (left_diff as f32, h_reciprocal as f32, var.sqrt() as f32);
        let noise = normals(&self.size, split.w_seed);
        let is_left = self.nodes[child].is_left;
        Ok(parent_w
            .iter()
            .zip(noise)
            .map(|(&w, z)| {
                let left_w = w * a * b + s * z;
                if is_left { left_w } else { w - left_w }
            })
            .collect())
    }

    fn remember(&mut self, node: usize, w: Arc<Vec<f32>>) {
        if self.nodes[node].w.is_none() {
            if self.cached.len() >= self.cache_size
                && let Some(old) = self.cached.pop_front()
            {
                self.nodes[old].w = None;
            }
            self.cached.push_back(node);
        }
        self.nodes[node].w = Some(w);
    }
}

/// diffusers' `BrownianTreeNoiseSampler` over a `BatchedBrownianTree`: increments of a
/// Brownian motion shaped like the sample between two noise levels, divided by the square root
/// of their distance, from one tree (one seed, the whole sample) or one tree per batch element
/// (a seed per image, each tree shaped like one element; the results stacked).
#[derive(Clone, Debug)]
pub(crate) struct BrownianTreeNoiseSampler {
    trees: Vec<BrownianInterval>,
    dims: Vec<usize>,
    /// -1 when the tree was built from reversed ends (`BatchedBrownianTree.sign`).
    sign: f32,
}

impl BrownianTreeNoiseSampler {
    /// Trees over `[min(sigma_a, sigma_b), max(..)]` for a sample of shape `dims`: one tree
    /// for one seed, else one per batch element (`seeds.len() == dims[0]`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`generator`) for no seed or a seed count that is neither 1
    /// nor the batch size; as [`BrownianInterval::diffusers`].
    pub(crate) fn new(sigma_a: f32, sigma_b: f32, dims: &[usize], seeds: &[u64]) -> Result<Self> {
        let (lo, hi, sign) = sort(sigma_a, sigma_b);
        let (lo, hi) = (f64::from(lo), f64::from(hi));
        let trees = match seeds {
            [] => {
                return Err(Error::invalid_argument(
                    "generator",
                    "no seed for the Brownian tree",
                ));
            }
            [seed] => vec![BrownianInterval::diffusers(
                lo,
                hi,
                dims,
                u128::from(*seed),
            )?],
            many if dims.first() == Some(&many.len()) => many
                .iter()
                .map(|&seed| BrownianInterval::diffusers(lo, hi, &dims[1..], u128::from(seed)))
                .collect::<Result<_>>()?,
            many => {
                return Err(Error::invalid_argument(
                    "generator",
                    format!(
                        "{} generators for a batch of {:?}: give one, or one per image",
                        many.len(),
                        dims.first()
                    ),
                ));
            }
        };
        Ok(Self {
            trees,
            dims: dims.to_vec(),
            sign,
        })
    }

    /// The sample shape the trees were built for.
    pub(crate) fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// `W(sigma, sigma_next) / sqrt(|sigma_next - sigma|)` in float32, row-major.
    ///
    /// # Errors
    /// As [`BrownianInterval::increment`].
    pub(crate) fn sample(&mut self, sigma: f32, sigma_next: f32) -> Result<Vec<f32>> {
        let (lo, hi, sign) = sort(sigma, sigma_next);
        let scale = self.sign * sign;
        let denom = (sigma_next - sigma).abs().sqrt();
        let mut out = Vec::with_capacity(self.dims.iter().product());
        for tree in &mut self.trees {
            let w = tree.increment(f64::from(lo), f64::from(hi))?;
            out.extend(w.into_iter().map(|v| (v * scale) / denom));
        }
        Ok(out)
    }
}

/// `BatchedBrownianTree.sort`: the ends in order and -1 when they were swapped.
fn sort(a: f32, b: f32) -> (f32, f32, f32) {
    if a < b { (a, b, 1.0) } else { (b, a, -1.0) }
}

/// `torch.randn(size, generator=torch.Generator().manual_seed(seed))` in float32.
fn normals(size: &[usize], seed: u32) -> Vec<f32> {
    TorchGenerator::new(u64::from(seed)).randn(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_of_ties_and_ordinary_values() {
        // round(0.0078125, 6) == 0.007812 (an exact binary tie rounds to even).
        assert_eq!(py_round(0.0078125, 6), 0.007812);
        assert_eq!(py_round(0.0234375, 6), 0.023438);
        assert_eq!(py_round(14.614641189575195, 6), 14.614641);
        assert_eq!(py_round(-2.5e-7, 6), -0.0);
        assert_eq!(py_round(0.5 * (0.029167 + 14.614641), 6), 7.321904);
    }

    #[test]
    fn zero_length_and_clamped_queries() {
        let mut bm = BrownianInterval::diffusers(0.0, 1.0, &[3], 5).unwrap();
        assert_eq!(bm.increment(0.25, 0.25).unwrap(), vec![0.0; 3]);
        let whole = bm.increment(0.0, 1.0).unwrap();
        assert_eq!(bm.increment(-3.0, 7.0).unwrap(), whole);
        assert!(bm.increment(0.6, 0.5).is_err());
        assert!(bm.increment(f64::NAN, 0.5).is_err());
    }

    #[test]
    fn increments_add_up_and_ignore_query_order() {
        let mut a = BrownianInterval::diffusers(0.0, 2.0, &[4], 9).unwrap();
        let mut b = a.clone();
        let x = a.increment(0.3, 0.9).unwrap();
        let y = a.increment(0.9, 1.7).unwrap();
        let xy = b.increment(0.3, 1.7).unwrap();
        for i in 0..4 {
            assert!((x[i] + y[i] - xy[i]).abs() < 1e-5);
        }
        assert_eq!(b.increment(0.9, 1.7).unwrap(), y);
        assert_eq!(b.increment(0.3, 0.9).unwrap(), x);
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(BrownianInterval::diffusers(1.0, 0.0, &[1], 0).is_err());
        assert!(BrownianInterval::diffusers(0.0, f64::INFINITY, &[1], 0).is_err());
        assert!(BrownianInterval::with_options(0.0, 1.0, &[1], 0, 3e-6, 24, 45).is_err());
        assert!(BrownianInterval::with_options(0.0, 1.0, &[1], 0, 1e-6, 2, 45).is_err());
        assert!(BrownianInterval::with_options(0.0, 1.0, &[1], 0, 1e-6, 24, 0).is_err());
    }
}
