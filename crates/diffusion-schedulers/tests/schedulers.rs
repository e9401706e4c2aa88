//! Scheduler tests, one binary: parity with diffusers on the oracle's fixtures, diffusers' own
//! test numbers, invariants, config files and bad input.

#[path = "schedulers/common.rs"]
mod common;
#[path = "schedulers/config.rs"]
mod config;
#[path = "schedulers/ddim_inverse.rs"]
mod ddim_inverse;
#[path = "schedulers/errors.rs"]
mod errors;
#[path = "schedulers/golden.rs"]
mod golden;
#[path = "schedulers/golden_sigma.rs"]
mod golden_sigma;
#[path = "schedulers/heun.rs"]
mod heun;
#[path = "schedulers/lcm.rs"]
mod lcm;
#[path = "schedulers/lms.rs"]
mod lms;
#[path = "schedulers/parity.rs"]
mod parity;
#[path = "schedulers/pndm.rs"]
mod pndm;
#[path = "schedulers/props.rs"]
mod props;
#[path = "schedulers/stateful.rs"]
mod stateful;
