//! Scheduler tests, one binary: parity with diffusers on the oracle's fixtures, diffusers' own
//! test numbers, invariants, config files and bad input.

#[path = "schedulers/beta_parallel.rs"]
mod beta_parallel;
#[path = "schedulers/cm.rs"]
mod cm;
#[path = "schedulers/common.rs"]
mod common;
#[path = "schedulers/config.rs"]
mod config;
#[path = "schedulers/cosine_dpm.rs"]
mod cosine_dpm;
#[path = "schedulers/cosine_tree.rs"]
mod cosine_tree;
#[path = "schedulers/ddim_inverse.rs"]
mod ddim_inverse;
#[path = "schedulers/deis.rs"]
mod deis;
#[path = "schedulers/dpm_inverse.rs"]
mod dpm_inverse;
#[path = "schedulers/dpm_sde.rs"]
mod dpm_sde;
#[path = "schedulers/dpm_single.rs"]
mod dpm_single;
#[path = "schedulers/edm_dpm.rs"]
mod edm_dpm;
#[path = "schedulers/edm_euler.rs"]
mod edm_euler;
#[path = "schedulers/errors.rs"]
mod errors;
#[path = "schedulers/extra.rs"]
mod extra;
#[path = "schedulers/flow_match.rs"]
mod flow_match;
#[path = "schedulers/golden.rs"]
mod golden;
#[path = "schedulers/golden_sigma.rs"]
mod golden_sigma;
#[path = "schedulers/heun.rs"]
mod heun;
#[path = "schedulers/ipndm.rs"]
mod ipndm;
#[path = "schedulers/kdpm2.rs"]
mod kdpm2;
#[path = "schedulers/lcm.rs"]
mod lcm;
#[path = "schedulers/lms.rs"]
mod lms;
#[path = "schedulers/more.rs"]
mod more;
#[path = "schedulers/parity.rs"]
mod parity;
#[path = "schedulers/pndm.rs"]
mod pndm;
#[path = "schedulers/props.rs"]
mod props;
#[path = "schedulers/repaint.rs"]
mod repaint;
#[path = "schedulers/sde_ve.rs"]
mod sde_ve;
#[path = "schedulers/stateful.rs"]
mod stateful;
#[path = "schedulers/tcd.rs"]
mod tcd;
#[path = "schedulers/unipc.rs"]
mod unipc;
