//! Parity with diffusers for the schedulers of fixtures/oracle/gen_schedulers_more.py
//! (fixtures/schedulers/more/): trajectories, add_noise, and diffusers' own test loops.

use anyhow::{Context, Result, ensure};
use diffusion_core::burn::tensor::Tensor;
use serde_json::Value;

use crate::common::{Tensors, host, read_json, rel_err_scaled};
use crate::parity::{check_forward_cases, check_trajectory};

#[test]
fn trajectories_match_diffusers() -> Result<()> {
    let cases = read_json("more/cases.json")?;
    let tensors = Tensors::load("more/trajectories.safetensors")?;
    let cases = cases.as_array().context("cases")?;
    let mut by_class = std::collections::BTreeMap::<String, (usize, f64)>::new();
    for case in cases {
        let err = check_trajectory(case, &tensors)?;
        let entry = by_class
            .entry(case["class"].as_str().unwrap_or("?").to_string())
            .or_default();
        *entry = (entry.0 + 1, entry.1.max(err));
    }
    for (class, (n, err)) in &by_class {
        eprintln!("  {class}: {n} trajectories, worst relative error {err:e}");
        ensure!(*n >= 5, "{class}: only {n} trajectories");
    }
    Ok(())
}

#[test]
fn add_noise_matches_diffusers() -> Result<()> {
    let (with_velocity, sigma_based) =
        check_forward_cases("more/forward.json", "more/forward.safetensors")?;
    ensure!(
        with_velocity == 0 && sigma_based >= 6,
        "{sigma_based} cases"
    );
    Ok(())
}

/// The oracle's record of one of diffusers' test loops.
pub(crate) struct Golden {
    /// The fixture folder (`more` or `extra`).
    pub dir: &'static str,
    pub name: String,
    pub sum: Option<f64>,
    pub mean: f64,
    pub mean_tol: f64,
    pub sum_tol: f64,
}

/// diffusers' expected numbers for the loop `name`, as cited in gen_schedulers_more.py.
pub(crate) fn golden(name: &str) -> Result<Golden> {
    golden_in("more", name)
}

/// diffusers' expected numbers for the loop `name` of the fixture folder `dir`.
pub(crate) fn golden_in(dir: &'static str, name: &str) -> Result<Golden> {
    let all = read_json(&format!("{dir}/golden.json"))?;
    let entry = all
        .as_array()
        .context("golden")?
        .iter()
        .find(|g| g["name"] == name)
        .with_context(|| format!("no golden loop {name}"))?;
    Ok(Golden {
        dir,
        name: name.to_string(),
        sum: entry["diffusers_test_sum"].as_f64(),
        mean: entry["diffusers_test_mean"]
            .as_f64()
            .context("diffusers_test_mean")?,
        mean_tol: entry["diffusers_test_mean_tol"]
            .as_f64()
            .context("diffusers_test_mean_tol")?,
        sum_tol: entry["diffusers_test_sum_tol"]
            .as_f64()
            .context("diffusers_test_sum_tol")?,
    })
}

/// Check a final sample against diffusers' hard-coded sum/mean (with the tolerances of its
/// test)
/// and against the oracle's final sample (1e-5 relative to the larger of the result and
/// `initial_scale`).
pub(crate) fn check_golden(g: &Golden, result: &Tensor<4>, initial_scale: f64) -> Result<()> {
    let v = host(result);
    let sum: f64 = v.iter().map(|x| f64::from(x.abs())).sum();
    let mean = sum / v.len() as f64;
    if let Some(expected) = g.sum {
        ensure!(
            (sum - expected).abs() < g.sum_tol,
            "{}: sum {sum} vs diffusers' {expected}",
            g.name
        );
    }
    ensure!(
        (mean - g.mean).abs() < g.mean_tol,
        "{}: mean {mean} vs diffusers' {}",
        g.name,
        g.mean
    );
    let oracle = Tensors::load(&format!("{}/golden.safetensors", g.dir))?;
    let err = rel_err_scaled(&v, oracle.values(&g.name)?, initial_scale);
    ensure!(
        err <= 1e-5,
        "{}: relative error {err:e} against the oracle",
        g.name
    );
    Ok(())
}

/// The default config diffusers saved for `class`.
pub(crate) fn default_config_file(class: &str) -> std::path::PathBuf {
    default_config_file_in("more", class)
}

/// The default config diffusers saved for `class` in the fixture folder `dir`.
pub(crate) fn default_config_file_in(dir: &str, class: &str) -> std::path::PathBuf {
    crate::common::fixtures()
        .join(dir)
        .join("configs")
        .join(class)
        .join("scheduler_config.json")
}

/// A config value with `_diffusers_version` and `_use_default_values` dropped.
pub(crate) fn comparable(mut v: Value) -> Value {
    if let Some(map) = v.as_object_mut() {
        map.remove("_diffusers_version");
        map.remove("_use_default_values");
    }
    v
}
