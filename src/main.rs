//! The taskgate binary: parse arguments and hand over to the library.
//!
//! It also chooses the process's allocator. glibc's `malloc` and `free`
//! were about 30% of taskgate's CPU (sled copies and drops tree nodes on
//! every write, and each task is decoded and encoded a few times).
//! jemalloc, with the options below, measured 20-25% less CPU per task than
//! glibc for accepting, draining and end to end, at the same resident
//! memory with a spooled backlog and 20 MiB less while draining it (measured
//! side by side with `scripts/bench` when it was chosen, commit debcbc9;
//! docs/benchmarks.md has the current figures).

use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them). Tuned for a small sidecar, each
/// measured: one arena rather than eight (taskgate's threads mostly wait;
/// more arenas cost memory, not speed), unused memory returned after 100 ms
/// rather than 10 s, and thread caches for objects up to 1 KiB only (larger
/// cached objects held 10 MiB while draining, for no gain).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"narenas:1,dirty_decay_ms:100,muzzy_decay_ms:0,tcache_max:1024\0"[0];

fn main() -> ExitCode {
    // lapin parses an AMQP header table on its own I/O thread, recursively
    // and without a depth limit: a message on the tracking queue whose
    // headers nest arrays 1,500 deep overflowed that thread's 2 MiB stack
    // and aborted the process. A frame holds at most 128 KiB (RabbitMQ's
    // frame_max), about 26,000 levels, which this stack size absorbs; it
    // is address space, not memory, until a thread touches it. Set before
    // any thread exists; RUST_MIN_STACK in the environment still wins.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", taskgate::cli::THREAD_STACK_BYTES.to_string());
    }
    taskgate::cli::run(taskgate::cli::Cli::parse())
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    /// One of jemalloc's `opt.*` values, as it read them at start.
    fn option<T: Default>(name: &CStr) -> T {
        let mut value = T::default();
        let mut size = std::mem::size_of::<T>();
        // SAFETY: `value` is a `T` of `size` bytes, the type jemalloc
        // documents for these options; nothing is written.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(status, 0, "mallctl({name:?})");
        value
    }

    /// The options above reach jemalloc (a misspelt symbol or option would
    /// leave its defaults in force, silently).
    #[test]
    fn jemalloc_runs_with_the_binary_options() {
        assert_eq!(option::<u32>(c"opt.narenas"), 1);
        assert_eq!(option::<isize>(c"opt.dirty_decay_ms"), 100);
        assert_eq!(option::<isize>(c"opt.muzzy_decay_ms"), 0);
        assert_eq!(option::<usize>(c"opt.tcache_max"), 1024);
    }
}
