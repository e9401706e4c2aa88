//! Backend selection: the one place that knows which burn backends were compiled in.
//!
//! burn 0.22 erases the backend from tensor and module types; a [`Device`] picks it at run time
//! among the backends enabled by this crate's cargo features:
//!
//! | feature   | device names          | notes                                              |
//! |-----------|-----------------------|----------------------------------------------------|
//! | `flex`    | `cpu`, `flex`         | default: pure Rust, f32/f16/bf16, no native library |
//! | `ndarray` | `ndarray`             | pure Rust, f32 only (deprecated upstream)           |
//! | `cuda`    | `cuda`, `cuda:N`      | loads libcuda/NVRTC at run time                     |
//! | `wgpu`    | `wgpu`                | any wgpu adapter (lavapipe works for tests)         |
//! | `tch`     | `tch`, `tch-cuda:N`   | libtorch, see README for pointing at a torch wheel  |

pub use burn::tensor::Device;

use crate::error::{Error, Result};

/// The names [`parse_device`] accepts with the features compiled into this build.
pub fn available_devices() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "flex") {
        names.extend(["cpu", "flex"]);
    }
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    if cfg!(feature = "cuda") {
        names.extend(["cuda", "cuda:N"]);
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "tch") {
        names.extend(["tch", "tch-cuda:N"]);
    }
    names
}

/// The device used when the user names none: the first GPU backend compiled in, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        return Device::cuda(0);
    }
    #[allow(unreachable_code)]
    {
        #[cfg(feature = "wgpu")]
        {
            return Device::wgpu(Default::default());
        }
        #[cfg(feature = "flex")]
        {
            return Device::flex();
        }
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        {
            return Device::ndarray();
        }
        Device::default()
    }
}

/// Parse a device name such as `cpu`, `cuda:1` or `wgpu`.
///
/// # Errors
/// [`Error::UnknownName`] listing what this build supports when the name is unknown or its
/// backend was not compiled in; [`Error::InvalidArgument`] for a bad index, and for `cuda`
/// when the CUDA driver or NVRTC does not load or has no device of that index.
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.trim().to_ascii_lowercase();
    let (kind, index) = match lower.split_once(':') {
        Some((k, i)) => {
            let index = i.parse::<usize>().map_err(|_| {
                Error::invalid_argument("device", format!("`{name}`: `{i}` is not a device index"))
            })?;
            (k.to_string(), Some(index))
        }
        None => (lower.clone(), None),
    };
    let _ = index;
    let device: Option<Device> = match kind.as_str() {
        #[cfg(feature = "flex")]
        "cpu" | "flex" => Some(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Some(Device::ndarray()),
        #[cfg(feature = "cuda")]
        "cuda" | "gpu" => Some(cuda_device(name, index.unwrap_or(0))?),
        #[cfg(feature = "wgpu")]
        "wgpu" => Some(Device::wgpu(Default::default())),
        #[cfg(feature = "tch")]
        "tch" => Some(Device::libtorch()),
        #[cfg(feature = "tch")]
        "tch-cuda" => Some(Device::libtorch_cuda(index.unwrap_or(0))),
        _ => None,
    };
    device.ok_or_else(|| Error::UnknownName {
        kind: "device",
        name: name.to_string(),
        known: available_devices().join(", "),
    })
}

/// `cuda:index`, once the CUDA driver and NVRTC have loaded and the driver has counted a device
/// `index`. Without these checks a missing driver or index surfaces as a panic in burn's CUDA
/// runtime at the first tensor operation.
#[cfg(feature = "cuda")]
fn cuda_device(name: &str, index: usize) -> Result<Device> {
    let unavailable = |why: String| Error::invalid_argument("device", format!("`{name}`: {why}"));
    // SAFETY: each only tries to open the library with libloading, as cudarc's calls do first.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "the CUDA driver library (libcuda.so) could not be loaded: is an NVIDIA driver \
             installed, and its library on the loader's path (LD_LIBRARY_PATH)?"
                .into(),
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "NVRTC (libnvrtc.so), which compiles the CUDA kernels at run time, could not be \
             loaded: install the CUDA runtime compiler library, or put it on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let count = cudarc::driver::result::init()
        .and_then(|()| cudarc::driver::result::device::get_count())
        .map_err(|e| unavailable(format!("the CUDA driver did not start: {e}")))?;
    let count = usize::try_from(count).unwrap_or(0);
    if index >= count {
        return Err(unavailable(format!(
            "the CUDA driver counts {count} device(s), numbered from 0"
        )));
    }
    Ok(Device::cuda(index))
}

/// Floating-point precision for weights and compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats (diffusers' default).
    #[default]
    F32,
    /// IEEE half precision (`torch.float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`).
    Bf16,
}

impl Precision {
    /// The burn dtype of this precision.
    pub fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            Self::F32 => burn::tensor::FloatDType::F32,
            Self::F16 => burn::tensor::FloatDType::F16,
            Self::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(Error::UnknownName {
                kind: "dtype",
                name: s.to_string(),
                known: "f32, f16, bf16".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_lists_the_known_ones() {
        let err = parse_device("quantum").unwrap_err().to_string();
        assert!(err.contains("quantum"), "{err}");
        #[cfg(feature = "flex")]
        assert!(err.contains("cpu"), "{err}");
    }

    /// Where no driver or NVRTC loads (this project's CI), `cuda` is a typed error naming the
    /// device; where they do, an index past the driver's count still is one.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_or_device_is_an_error() {
        // SAFETY: as in `cuda_device`.
        let loads = unsafe {
            cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
        };
        let name = if loads { "cuda:4096" } else { "cuda" };
        let err = parse_device(name).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("device"), "{err}");
        if !loads {
            assert!(
                err.contains("libcuda.so") || err.contains("libnvrtc.so"),
                "{err}"
            );
        }
    }

    #[test]
    fn precision_names() {
        assert_eq!("fp16".parse::<Precision>().unwrap(), Precision::F16);
        assert_eq!("bfloat16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("f8".parse::<Precision>().is_err());
    }
}
