//! `weft inspect FILE`: what is in a safetensors file, and its content hash.
//!
//! The file is never read whole: its header length is checked against the file's size before
//! anything else, the file is memory-mapped, and each tensor is scanned and hashed in turn, so
//! a multi-gigabyte model (or a file that only claims to be one) costs its header, not its size.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use safetensors::{Dtype, SafeTensors};
use weft_core::CanonicalHasher;

use crate::say;

/// The largest header the safetensors format accepts (its own limit): 100 MB.
const MAX_HEADER: u64 = 100_000_000;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A safetensors file (a base, a delta, a sovereign artifact or any model).
    pub file: PathBuf,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let path = &args.file;
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut prefix = [0u8; 8];
    if size < 8 {
        bail!(
            "{}: {size} bytes is too short for a safetensors file (8-byte header length, then the header)",
            path.display()
        );
    }
    file.read_exact(&mut prefix).with_context(|| format!("reading {}", path.display()))?;
    let header = u64::from_le_bytes(prefix);
    if header > MAX_HEADER {
        bail!(
            "{}: the header claims {header} bytes, more than safetensors allows ({MAX_HEADER}): not a safetensors file",
            path.display()
        );
    }
    if header > size - 8 {
        bail!("{}: the header claims {header} bytes but the file holds only {} after its length: truncated or not a safetensors file", path.display(), size - 8);
    }
    // SAFETY: the map is only read; a file changed underneath while we read it can give a wrong
    // listing or hash, never memory unsafety beyond what any reader of a changing file sees.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    let st = SafeTensors::deserialize(&map).with_context(|| format!("parsing {}", path.display()))?;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let all_f32 = st.tensors().iter().all(|(_, view)| view.dtype() == Dtype::F32);
    let mut hasher = CanonicalHasher::new(names.len());
    let mut values = 0usize;
    for name in &names {
        let view = st.tensor(name)?;
        let len: usize = view.shape().iter().product();
        values += len;
        let mut note = String::new();
        if view.dtype() == Dtype::F32 {
            let first_bad =
                view.data().chunks_exact(4).position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
            if let Some(i) = first_bad {
                note = format!("  non-finite at {i}");
            }
            hasher.begin_tensor(name, view.shape(), len);
            hasher.update_le_bytes(view.data());
        } else {
            note = format!("  {:?}", view.dtype());
        }
        say!("{name:<28} {:<14} {len:>10}{note}", format!("{:?}", view.shape()));
    }
    say!("{} tensors, {values} values", names.len());
    if all_f32 {
        say!("content hash {}", hasher.finish());
    } else {
        say!("content hash: only for f32 states (weft's canonical form); this file holds other dtypes");
    }
    Ok(())
}
