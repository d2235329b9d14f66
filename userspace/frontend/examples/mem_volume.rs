//! Serve an in-memory volume as /dev/loopN (FUSE file + loop, direct I/O) until stdin closes.
//! For manual experiments and benchmarks: `cargo run --release --example mem_volume -- 256`.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_frontend::{attach_loop_with, BackendError, BlockBackend, FileFrontend, LoopOptions};

struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let d = self.0.lock().unwrap();
        Ok(Bytes::copy_from_slice(&d[offset as usize..offset as usize + len as usize]))
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.discard(offset, len)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let dir = std::env::temp_dir().join(format!("tandem-mem-volume-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let backend = Arc::new(Mem(Mutex::new(vec![0; (mib << 20) as usize])));
    let mut mounted = FileFrontend::new(backend)?.mount(Path::new(&dir))?;
    let opts = LoopOptions { direct_io: true, block_size: Some(4096), read_only: false };
    let mut dev = attach_loop_with(mounted.file(), &opts)?;
    println!("{}", dev.path().display());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    dev.detach()?;
    mounted.unmount()?;
    std::fs::remove_dir(&dir)?;
    Ok(())
}
