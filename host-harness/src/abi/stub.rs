//! Every import the harness does not implement: linked from the module's
//! own import list, so instantiation never fails on a missing function.
//! A stub counts the call by name (in the instance's `unimplemented` and
//! host-call counts) and answers `UNIMPLEMENTED` (12); results that are not
//! an `i32` status are zeroed. Nothing is ignored silently: a runner fails
//! when any stub was called.

use wasmtime::{Caller, ExternType, Linker, Module, Val, ValType};

use super::{Status, ENV, WASI_P1};
use crate::state::HostState;

/// True for a function import the harness does not implement: an `env`
/// function outside `implemented`, or anything from a module other than
/// `env` and WASI preview1 (which wasmtime-wasi provides whole).
fn is_stubbed(implemented: &[&str], module: &str, name: &str) -> bool {
    match module {
        ENV => !implemented.contains(&name),
        WASI_P1 => false,
        _ => true,
    }
}

/// Links a stub for each function `module` imports that is not
/// implemented (`implemented`: the `env` calls already linked); returns
/// them, as (module, name).
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(
    linker: &mut Linker<HostState>,
    module: &Module,
    implemented: &[&str],
) -> wasmtime::Result<Vec<(String, String)>> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else { continue };
        if !is_stubbed(implemented, import.module(), import.name()) {
            continue;
        }
        stubbed.push((import.module().to_string(), import.name().to_string()));
        let label = if import.module() == ENV {
            import.name().to_string()
        } else {
            format!("{}.{}", import.module(), import.name())
        };
        linker.func_new(
            import.module(),
            import.name(),
            ty.clone(),
            move |mut caller: Caller<'_, HostState>, _params: &[Val], results: &mut [Val]| {
                caller.data_mut().record_unimplemented(&label);
                for (i, (slot, ty)) in results.iter_mut().zip(ty.results()).enumerate() {
                    *slot = match ty {
                        ValType::I32 if i == 0 => Val::I32(Status::Unimplemented as i32),
                        other => Val::default_for_ty(&other).unwrap_or(Val::I32(0)),
                    };
                }
                Ok(())
            },
        )?;
    }
    Ok(stubbed)
}
