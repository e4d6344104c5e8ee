//! Guest memory: reading arguments out, and handing results in through the
//! guest's own allocator (`proxy_on_memory_allocate`, else `malloc`), as
//! Envoy does. A bad pointer is `INVALID_MEMORY_ACCESS`, never a host panic.

use wasmtime::Caller;

use super::{HostError, Status};
use crate::state::{GuestExports, HostState};

fn guest(caller: &Caller<'_, HostState>) -> Result<GuestExports, HostError> {
    // Host calls made before the instance's exports are known (from a start
    // function) cannot reach memory.
    caller.data().guest.clone().ok_or(HostError::Status(Status::InternalFailure))
}

/// Copies `len` bytes at `ptr` out of the guest.
///
/// # Errors
/// `INVALID_MEMORY_ACCESS` for a range outside memory.
pub fn read(caller: &Caller<'_, HostState>, ptr: u32, len: u32) -> Result<Vec<u8>, HostError> {
    let memory = guest(caller)?.memory;
    let mut buf = vec![0; len as usize];
    memory.read(caller, ptr as usize, &mut buf).map_err(|_| Status::InvalidMemoryAccess)?;
    Ok(buf)
}

/// Reads a UTF-8 string argument (header names, property segments).
///
/// # Errors
/// `INVALID_MEMORY_ACCESS` for a bad range, `BAD_ARGUMENT` for bytes that are
/// not UTF-8.
pub fn read_str(caller: &Caller<'_, HostState>, ptr: u32, len: u32) -> Result<String, HostError> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| HostError::Status(Status::BadArgument))
}

/// Writes a little-endian `u32` to `ptr`.
///
/// # Errors
/// `INVALID_MEMORY_ACCESS` for a range outside memory.
pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: u32, value: u32) -> Result<(), HostError> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Writes a little-endian `u64` to `ptr`.
///
/// # Errors
/// `INVALID_MEMORY_ACCESS` for a range outside memory.
pub fn write_u64(caller: &mut Caller<'_, HostState>, ptr: u32, value: u64) -> Result<(), HostError> {
    write(caller, ptr, &value.to_le_bytes())
}

fn write(caller: &mut Caller<'_, HostState>, ptr: u32, bytes: &[u8]) -> Result<(), HostError> {
    let memory = guest(caller)?.memory;
    memory.write(caller, ptr as usize, bytes).map_err(|_| HostError::Status(Status::InvalidMemoryAccess))
}

/// Hands `bytes` to the guest: allocates a buffer with the guest's
/// allocator, copies the bytes in, and writes its address to `ptr_out` and
/// its size to `size_out`. Empty data is handed over as a null pointer and
/// size 0, as Envoy does (the Rust SDK reads that as "no value" for
/// properties and buffers).
///
/// # Errors
/// `INVALID_MEMORY_ACCESS` for bad out-pointers or a failed allocation; a
/// trap in the guest's allocator.
pub fn give(caller: &mut Caller<'_, HostState>, bytes: &[u8], ptr_out: u32, size_out: u32) -> Result<(), HostError> {
    let size = u32::try_from(bytes.len()).map_err(|_| HostError::Status(Status::InvalidMemoryAccess))?;
    let mut addr = 0;
    if size > 0 {
        let alloc = guest(caller)?.alloc;
        addr = alloc.call(&mut *caller, size).map_err(HostError::Trap)?;
        if addr == 0 {
            return Err(HostError::Status(Status::InvalidMemoryAccess));
        }
        write(caller, addr, bytes)?;
    }
    write_u32(caller, ptr_out, addr)?;
    write_u32(caller, size_out, size)
}
