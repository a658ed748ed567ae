//! The `worker-runtime` binary with the built-in work types.

fn main() -> std::process::ExitCode {
    rota_worker_runtime::cli::main(rota_worker_runtime::Registry::with_builtins())
}
