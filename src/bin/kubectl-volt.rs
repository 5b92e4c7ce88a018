//! `kubectl volt`: see [`volt_operator::plugin`].

fn main() -> std::process::ExitCode {
    volt_operator::plugin::main()
}
