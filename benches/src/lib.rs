//! Shared pieces of the benchmarks: the devices compiled into this build.

use diffusion_core::Device;

/// The CPU backends to compare, by name, among those compiled in.
pub fn cpu_devices() -> Vec<(&'static str, Device)> {
    let mut out = Vec::new();
    #[cfg(feature = "flex")]
    out.push(("flex", Device::flex()));
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    out.push(("ndarray", Device::ndarray()));
    out
}
