//! The hardware seam: which device to run on. With the `cuda` feature off the same API compiles
//! and says "built without CUDA".
use candle_core::Device;

/// What the user asked for (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when compiled in and a GPU answers, else CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown device {other:?} (cpu, cuda or auto)")),
        }
    }
}

/// The chosen device, and why when `auto` fell back to the CPU.
pub struct Selected {
    pub device: Device,
    pub fallback_reason: Option<String>,
}

/// Picks the device. `cuda` fails with a clear message when impossible; `auto` falls back.
pub fn select_device(choice: DeviceChoice) -> Result<Selected, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Selected {
            device: Device::Cpu,
            fallback_reason: None,
        }),
        DeviceChoice::Cuda => cuda_device().map(|device| Selected {
            device,
            fallback_reason: None,
        }),
        DeviceChoice::Auto => Ok(match cuda_device() {
            Ok(device) => Selected {
                device,
                fallback_reason: None,
            },
            Err(why) => Selected {
                device: Device::Cpu,
                fallback_reason: Some(why),
            },
        }),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, String> {
    // candle panics when libcuda is missing: look for it first.
    // SAFETY: only tries to load the driver library; no driver call is made.
    #[allow(unsafe_code)]
    let present = unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() };
    if !present {
        return Err("no CUDA driver library (libcuda.so) found".into());
    }
    std::panic::catch_unwind(|| Device::new_cuda(0))
        .map_err(|_| "the CUDA driver could not be initialised".to_string())?
        .map_err(|e| format!("no usable GPU: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device, String> {
    Err("this build of pagoda was compiled without CUDA (build with scripts/build-cuda)".into())
}

/// Free and total memory of a GPU in bytes; `None` for the CPU.
pub fn memory_info(device: &Device) -> Option<(usize, usize)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

/// Whether this build has the CUDA path.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// The CPU's `model name` from `/proc/cpuinfo` (benchmarks name their machine), else "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
